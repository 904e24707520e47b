"""Record sources on small real files: tar shards (with corrupt members), CSV/TSV/JSONL, ArrayRecord."""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest

from cosmos_jax.data import sources
from cosmos_jax.data.sources import (DataSourceError, RecordSource, TabularSource, TarSource,
                                     expand_braces, expand_shards, open_source)


def _encode(seed: int, fmt: str = 'JPEG', size=(12, 10)) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format=fmt)
  return buf.getvalue()


def _meta(i: int) -> dict:
  return {'raw_caption': [f'photo {i}'], 'shortIB_captions': [f'a thing {i}', 'on a table'],
          'longSV_captions': ['It is big', 'the light is warm'], 'url': f'http://x/{i}.jpg'}


def _write_tar(path, members) -> list[int]:
  """Writes (name, bytes) members; returns each member's data offset."""
  offsets = []
  with tarfile.open(path, 'w', format=tarfile.USTAR_FORMAT) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      offsets.append(tar.offset + tarfile.BLOCKSIZE)
      tar.addfile(info, io.BytesIO(data))
  return offsets


def _good(key: str, seed: int):
  return [(f'{key}.jpg', _encode(seed)), (f'{key}.json', json.dumps(_meta(seed)).encode())]


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """Three shards: 7 samples (4 good), 3 (cut mid-member; 2 good), 3 (cut mid-header; 2 good)."""
  root = tmp_path_factory.mktemp('shards')
  expected = {}  # record key -> (image bytes, meta, mask) for the good records
  a = [*_good('000', 0), ('000.txt', b'photo 0'),
       ('001.png', _encode(1, 'PNG')), ('001.json', json.dumps(_meta(1)).encode()),
       ('001.mask.png', _encode(11, 'PNG')),
       ('002.jpg', os.urandom(300)), ('002.json', json.dumps(_meta(2)).encode()),  # undecodable
       ('003.jpg', _encode(3)),                                                     # no json
       ('004.jpg', _encode(4)), ('004.json', b'{"raw_caption": [oops'),               # bad json
       ('005.json', json.dumps(_meta(5)).encode()),                                 # json only
       ('sub/006.jpeg', _encode(6)), ('sub/006.json', json.dumps(_meta(6)).encode())]
  _write_tar(root / 'shard-0000.tar', a)
  data = dict(a)
  for key, img, mask in (('000', '000.jpg', None), ('001', '001.png', '001.mask.png'),
                         ('002', '002.jpg', None), ('sub/006', 'sub/006.jpeg', None)):
    expected[f'shard-0000.tar/{key}'] = (data[img], json.loads(data[key + '.json']),
                                         data[mask] if mask else None)
  b = [*_good('100', 100), *_good('101', 101), *_good('102', 102)]
  offsets = _write_tar(root / 'shard-0001.tar', b)
  with open(root / 'shard-0001.tar', 'r+b') as f:  # cut inside 102.json's data
    f.truncate(offsets[5] + 10)
  c = [*_good('200', 200), *_good('201', 201), *_good('202', 202)]
  offsets = _write_tar(root / 'shard-0002.tar', c)
  with open(root / 'shard-0002.tar', 'r+b') as f:  # cut 60 bytes into 202.jpg's header
    f.truncate(offsets[4] - tarfile.BLOCKSIZE + 60)
  for shard, members in (('shard-0001.tar', b[:4]), ('shard-0002.tar', c[:4])):
    for name, payload in members[::2]:
      key = name.split('.')[0]
      expected[f'{shard}/{key}'] = (payload, json.loads(dict(members)[key + '.json']), None)
  return root, expected


def _check_good(src, expected):
  got = {}
  for i in range(len(src)):
    record = src[i]
    if 'error' not in record:
      got[record['key']] = (record['image'], record['meta'], record.get('mask'))
  assert got == expected


def test_expand_braces_and_joins(tmp_path):
  assert expand_braces('cc3m-train-{0000..0002}.tar') == [
      'cc3m-train-0000.tar', 'cc3m-train-0001.tar', 'cc3m-train-0002.tar']
  assert expand_braces('{a,b}-{8..10}') == ['a-8', 'a-9', 'a-10', 'b-8', 'b-9', 'b-10']
  assert expand_braces('x{1,{2..3}}y') == ['x1y', 'x2y', 'x3y']
  assert expand_braces('{2..0}') == ['2', '1', '0']
  assert expand_braces('{0..4..2}') == ['0', '2', '4']
  assert expand_braces('lit{x}') == ['lit{x}']
  spec = 'a/cc3m-{0001..0002}.tar::b/{00000..00001}.tar'
  assert expand_shards(spec, check_exists=False) == [
      'a/cc3m-0001.tar', 'a/cc3m-0002.tar', 'b/00000.tar', 'b/00001.tar']
  for empty in ('', '::'):
    with pytest.raises(DataSourceError, match='no shards'):
      expand_shards(empty)
  with pytest.raises(DataSourceError, match='unbalanced'):
    expand_shards('a-{0..1.tar', check_exists=False)
  with pytest.raises(DataSourceError, match='local'):
    expand_shards('pipe:curl http://x/{0..1}.tar')


def test_missing_shard_is_named(shards):
  root, _ = shards
  with pytest.raises(DataSourceError) as e:
    TarSource(f'{root}/shard-{{0000..0003}}.tar')
  assert 'shard-0003.tar' in str(e.value) and '1 of 4' in str(e.value)


def test_tar_source_good_and_error_records(shards):
  root, expected = shards
  src = TarSource(f'{root}/shard-{{0000..0001}}.tar::{root}/shard-0002.tar')
  assert isinstance(src, RecordSource)
  assert list(src.shard_counts) == [7, 3, 3] and len(src) == 13
  assert src.num_errors == 4  # known from the headers; the malformed json shows up on read
  errors = {src[i]['key']: src[i]['error'] for i in range(len(src)) if 'error' in src[i]}
  assert set(errors) == {'shard-0000.tar/003', 'shard-0000.tar/004', 'shard-0000.tar/005',
                         'shard-0001.tar/102', 'shard-0002.tar/202'}
  assert 'missing json' in errors['shard-0000.tar/003']
  assert 'JSONDecodeError' in errors['shard-0000.tar/004']
  assert 'missing image' in errors['shard-0000.tar/005'] and '.json' in errors['shard-0000.tar/005']
  assert 'truncated member 102.json' in errors['shard-0001.tar/102']
  assert 'broken tar header' in errors['shard-0002.tar/202']
  _check_good(src, expected)
  assert src[-1]['key'] == 'shard-0002.tar/202' and src.shard_of(0).endswith('shard-0000.tar')
  with pytest.raises(IndexError):
    src[13]
  assert sum(1 for _ in src) == 13  # plain iteration stops at IndexError


def test_tar_cut_anywhere(tmp_path):
  """Cut a shard at many points: never raises; a sample is good iff its members end before the cut."""
  members = [m for i in range(4) for m in _good(f'{i:03d}', i)]
  offsets = _write_tar(tmp_path / 'full.tar', members)
  full = (tmp_path / 'full.tar').read_bytes()
  ends = [max(offsets[j] + len(members[j][1]) for j in (2 * k, 2 * k + 1)) for k in range(4)]
  for cut in range(1, len(full), 97):
    (tmp_path / 'cut.tar').write_bytes(full[:cut])
    src = TarSource(str(tmp_path / 'cut.tar'))
    good = [src[i]['key'] for i in range(len(src)) if 'error' not in src[i]]
    assert good == [f'cut.tar/{k:03d}' for k in range(4) if ends[k] <= cut], cut
    assert len(src) - len(good) <= 1, cut  # at most the one cut sample is an error record


def test_tar_options_and_name_clashes(shards, tmp_path):
  root, _ = shards
  _write_tar(tmp_path / 'shard-0000.tar', [('k.jpg', b'x'), ('k.txt', b' a caption \n'),
                                            ('k.webp', b'y'), ('dir/', b'')])
  assert TarSource(str(tmp_path / 'shard-0000.tar'))[0]['error'].startswith('missing json')
  record = TarSource(str(tmp_path / 'shard-0000.tar'), require_json=False)[0]
  assert record['image'] == b'x' and record['meta'] == {'caption': 'a caption'}
  both = TarSource(f'{root}/shard-0000.tar::{tmp_path}/shard-0000.tar')
  keys = [both[i]['key'] for i in range(len(both))]
  assert len(set(keys)) == len(keys) == 8 and all('shard-0000.tar/' in k for k in keys)
  twice = TarSource([f'{root}/shard-0000.tar'] * 2)
  assert twice[7]['key'] == 'shard-0000.tar#2/000' and len({twice[i]['key'] for i in range(14)}) == 14
  (tmp_path / 'notatar.tar').write_bytes(b'\x1f\x8b' + os.urandom(2000))
  broken = TarSource(str(tmp_path / 'notatar.tar'))
  assert len(broken) == 1 and 'not an uncompressed tar' in broken[0]['error']


def test_tar_pickle_and_process_index(shards):
  root, expected = shards
  src = TarSource(f'{root}/shard-{{0000..0002}}.tar')
  copy = pickle.loads(pickle.dumps(src))
  _check_good(copy, expected)
  parallel = TarSource(f'{root}/shard-{{0000..0002}}.tar', index_workers=2)
  assert [parallel[i] for i in range(len(parallel))] == [src[i] for i in range(len(src))]


def test_grain_map_dataset(shards):
  grain = pytest.importorskip('grain')
  root, expected = shards
  ds = grain.MapDataset.source(TarSource(f'{root}/shard-{{0000..0002}}.tar'))
  records = [r for r in ds.filter(lambda r: 'error' not in r)]
  assert {r['key'] for r in records} == set(expected)


@pytest.fixture()
def table_dir(tmp_path):
  (tmp_path / 'imgs').mkdir()
  for i in range(3):
    (tmp_path / 'imgs' / f'{i}.jpg').write_bytes(_encode(i))
  return tmp_path


def test_csv_and_tsv(table_dir):
  (table_dir / 'pairs.csv').write_text(
      'filepath,title\nimgs/0.jpg,"a dog, running"\nimgs/1.jpg,a cat\nimgs/nope.jpg,gone\n')
  src = TabularSource(str(table_dir / 'pairs.csv'))
  assert len(src) == 3
  assert src[0] == {'key': 'pairs.csv:0', 'image': _encode(0), 'meta': {'caption': 'a dog, running'}}
  assert src[2]['key'] == 'pairs.csv:2' and 'nope.jpg' in src[2]['error']
  (table_dir / 'pairs.tsv').write_text('path\tcap\nimgs/2.jpg\tx, y\n')
  src = TabularSource(str(table_dir / 'pairs.tsv'), image_key='path', caption_key='cap')
  assert src[0]['meta'] == {'caption': 'x, y'} and src[0]['image'] == _encode(2)
  (table_dir / 'tabbed.csv').write_text('filepath\ttitle\nimgs/1.jpg\ta cat\n')  # open_clip style
  assert TabularSource(str(table_dir / 'tabbed.csv'))[0]['meta'] == {'caption': 'a cat'}
  with pytest.raises(DataSourceError, match=r"'title'.*\['filepath', 'caption'\]"):
    (table_dir / 'bad.csv').write_text('filepath,caption\nimgs/0.jpg,a\n')
    TabularSource(str(table_dir / 'bad.csv'))


def test_jsonl(table_dir):
  rows = [{'filepath': 'imgs/0.jpg', 'caption': 'one'},
          {'filepath': 'imgs/1.jpg', 'captions': ['two', 'three']}]
  text = '\n'.join(json.dumps(r) for r in rows) + '\n\n{broken\n{"filepath": "imgs/9.jpg", "caption": "x"}\n'
  (table_dir / 'pairs.jsonl').write_text(text)
  src = TabularSource(str(table_dir / 'pairs.jsonl'))
  assert len(src) == 4
  assert src[0]['meta'] == {'caption': 'one'} and src[1]['meta'] == {'captions': ['two', 'three']}
  assert 'line 4' in src[2]['error'] and 'imgs/9.jpg' in src[3]['error']
  (table_dir / 'bad.jsonl').write_text(json.dumps({'image': 'imgs/0.jpg', 'caption': 'a'}) + '\n')
  with pytest.raises(DataSourceError, match=r"'filepath'.*\['image', 'caption'\]"):
    TabularSource(str(table_dir / 'bad.jsonl'))


class _PixelSource(RecordSource):
  """Decoded images, as the synthetic dataset or a tfds Image dataset gives them."""
  name = 'pixels'

  def __len__(self):
    return 3

  def __getitem__(self, i):
    i = self._check_index(i)
    rng = np.random.default_rng(i)
    return {'key': f'px/{i}', 'image': rng.integers(0, 256, (6, 5, 3), np.uint8),
            'meta': {'caption': f'c{i}'}, 'mask': rng.integers(0, 3, (6, 5), np.uint8)}


def test_array_record_round_trip(shards, tmp_path):
  root, expected = shards
  src = TarSource(f'{root}/shard-{{0000..0002}}.tar')
  out = sources.convert_to_array_record(src, str(tmp_path / 'ar'), num_shards=2, progress=False)
  summary = json.load(open(os.path.join(out, 'cosmos_conversion.json')))['splits']['train']
  assert (summary['written'], summary['skipped']) == (8, 5)
  assert {r['key'] for r in summary['skipped_records']} == {
      src[i]['key'] for i in range(len(src)) if 'error' in src[i]}
  with pytest.raises(DataSourceError, match='exists'):
    sources.convert_to_array_record(src, str(tmp_path / 'ar'), progress=False)
  read = open_source(str(tmp_path / 'ar'))
  assert type(read).__name__ == 'ArrayRecordSource' and len(read) == 8
  _check_good(pickle.loads(pickle.dumps(read)), expected)
  # A fresh process without the builder code, through tfds.builder_from_directory.
  script = (
      'import sys, json, hashlib, tensorflow_datasets as tfds\n'
      f'ds = tfds.builder_from_directory({out!r}).as_data_source("train")\n'
      'rows = {ds[i]["key"].decode(): [hashlib.sha1(ds[i]["image"]).hexdigest(),\n'
      '        json.loads(ds[i]["meta"])] for i in range(len(ds))}\n'
      'print(json.dumps([rows, "tensorflow" in sys.modules]))\n')
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True)
  rows, tf_loaded = json.loads(proc.stdout.strip().splitlines()[-1])
  assert rows == {k: [hashlib.sha1(v[0]).hexdigest(), v[1]] for k, v in expected.items()}
  assert not tf_loaded
  # Decoded pixels are stored losslessly (png) and come back identical after decoding.
  out = sources.convert_to_array_record({'val': _PixelSource()}, str(tmp_path / 'px'), progress=False)
  back = sources.ArrayRecordSource(out, split='val')
  with pytest.raises(DataSourceError, match="no split 'train'"):
    sources.ArrayRecordSource(out)
  for record in (back[i] for i in range(len(back))):
    i = int(record['key'].split('/')[1])
    want = _PixelSource()[i]
    assert record['meta'] == want['meta']
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(record['image']))), want['image'])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(record['mask']))), want['mask'])
  assert 'tensorflow' not in sys.modules


def test_open_source_dispatch(shards, table_dir, tmp_path):
  root, _ = shards
  assert isinstance(open_source(f'{root}/shard-{{0000..0001}}.tar'), TarSource)
  assert len(open_source(f'{root}/shard-0000.tar')) == 7
  assert len(open_source(str(root))) == 13  # a directory of shards
  (table_dir / 'p.csv').write_text('filepath,title\nimgs/0.jpg,a\n')
  assert isinstance(open_source(str(table_dir / 'p.csv')), TabularSource)
  with pytest.raises(DataSourceError, match='nowhere.parquet'):
    open_source(str(tmp_path / 'nowhere.parquet'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataSourceError, match='neither'):
    open_source(str(tmp_path / 'empty'))
  synthetic = open_source('synthetic:val', num_val=8, image_size=32)
  assert len(synthetic) == 8 and synthetic.name == 'synthetic:val'
  record = pickle.loads(pickle.dumps(synthetic))[-1]
  assert record['key'] == 'val_00000007' and isinstance(record['meta'], dict)
  assert record['image'].shape == (32, 32, 3) and record['image'].dtype == np.uint8
  assert record['mask'].shape == (32, 32)
  with pytest.raises(DataSourceError, match='synthetic:test'):
    open_source('synthetic:test')


def _damaged_shards(root):
  """good.tar (10 samples), cut.tar (cut inside 004.jpg), html.tar (not a tar), empty.tar (0 B)."""
  members = [m for i in range(10) for m in _good(f'{i:03d}', i)]
  offsets = _write_tar(root / 'good.tar', members)
  (root / 'cut.tar').write_bytes((root / 'good.tar').read_bytes()[:offsets[8] + 10])
  (root / 'html.tar').write_bytes(b'<html><body>404 Not Found</body></html>\n' * 40)
  (root / 'empty.tar').write_bytes(b'')
  return [str(root / f'{n}.tar') for n in ('good', 'cut', 'html', 'empty')]


def test_damaged_shards_named_with_what_they_lost(tmp_path, caplog):
  paths = _damaged_shards(tmp_path)
  # open_clip's sizes.json for three shards, img2dataset's <stem>_stats.json for the fourth.
  (tmp_path / 'sizes.json').write_text(json.dumps({'good.tar': 10, 'cut.tar': 10, 'html.tar': 10}))
  (tmp_path / 'empty_stats.json').write_text(json.dumps({'successes': 10, 'failed': 2}))
  with caplog.at_level('WARNING', logger='cosmos_jax.data.sources.tar'):
    src = TarSource(paths)
  good, cut, html, empty = src.shard_reports
  assert (good.indexed, good.missing, good.is_bad) == (10, 0, False)
  # cut.tar: 000-003 whole, 004 is the cut record, 005-009 are gone.
  assert (cut.expected, cut.indexed, cut.unreadable, cut.missing) == (10, 5, 1, 5)
  assert 'truncated' in cut.problem and '004.jpg' in cut.problem
  # html.tar: one error record for the whole file, the other 9 are missing.
  assert (html.indexed, html.unreadable, html.missing) == (1, 1, 9)
  assert 'not an uncompressed tar' in html.problem
  assert (empty.expected, empty.indexed, empty.missing, empty.problem) == (
      10, 0, 10, 'empty file (0 bytes)')
  assert src.missing_records == 5 + 9 + 10 and len(src) == 10 + 5 + 1
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 3 and warnings == src.problems()
  assert warnings[0].startswith(f'shard {paths[1]}: truncated') and '4 of 10 samples readable (5 missing, 1 unreadable)' in warnings[0]
  assert f'shard {paths[2]}: not an uncompressed tar' in warnings[1] and '0 of 10' in warnings[1]
  assert f'shard {paths[3]}: empty file' in warnings[2] and '(10 missing)' in warnings[2]
  assert pickle.loads(pickle.dumps(src)).missing_records == 24


def test_damaged_shards_without_an_index(tmp_path):
  paths = _damaged_shards(tmp_path)
  (tmp_path / 'sizes.json').write_text('{not json')  # ignored with a warning, not fatal
  src = TarSource(paths)
  assert src.missing_records == 0 and [r.expected for r in src.shard_reports] == [None] * 4
  problems = src.problems()
  assert len(problems) == 3 and all('unknown' in p for p in problems)
  assert 'cut_stats.json' in problems[0] and '4 samples readable, 1 unreadable' in problems[0]
  assert src.location() == ', '.join(paths)
