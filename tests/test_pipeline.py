"""The grain training pipeline: skips, batches, determinism, epochs, resume, host sharding."""

import io
import json
import logging
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from cosmos_jax.data import augment, captions, sources
from cosmos_jax.data import pipeline as P

G, L = 32, 16
MULTICROP = augment.MultiCropConfig(global_size=G, local_size=L)


def _encode(array: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


class FakeSource:
  """Picklable in-memory source: PNG/JPEG bytes or arrays, DreamLIP-like metas.

  Every bad_every-th record (i % bad_every == bad_every - 1) is bad, in turn: random
  bytes, a truncated JPEG, an empty caption pool, an 'error' record. 0: none is bad.
  """

  def __init__(self, n: int = 40, bad_every: int = 10):
    self.n = n
    self.bad_every = bad_every

  def __len__(self):
    return self.n

  def bad_kind(self, i):
    if not self.bad_every or i % self.bad_every != self.bad_every - 1:
      return None
    return ('bytes', 'truncated', 'empty', 'error')[(i // self.bad_every) % 4]

  def __getitem__(self, i):
    key = f'rec{i:04d}'
    kind = self.bad_kind(i)
    if kind == 'error':
      return {'key': key, 'error': 'tar member unreadable'}
    rng = np.random.default_rng(i)
    array = rng.integers(0, 256, (20 + i % 7, 24 + i % 5, 3), dtype=np.uint8)
    image = (array if i % 3 == 2 else _encode(array, 'PNG' if i % 3 else 'JPEG'))
    meta = {'raw_caption': [f'item {i}'], 'shortIB_captions': [f'a small thing {i}'],
            'longSV_captions': [f'long sentence {i} one', f'long sentence {i} two'],
            'url': 'http://example.com'}
    if kind == 'bytes':
      image = rng.bytes(300)
    elif kind == 'truncated':
      image = _encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), 'JPEG')[:400]
    elif kind == 'empty':
      meta = {'raw_caption': [], 'shortIB_captions': ['  '], 'url': 'x'}
    return {'key': key, 'image': image, 'meta': meta}

  def good_keys(self):
    return {f'rec{i:04d}' for i in range(self.n) if self.bad_kind(i) is None}


def _cfg(**kw):
  base = dict(global_batch_size=4, multicrop=MULTICROP, read_threads=0,
              max_bad_fraction=0.2, min_samples_before_check=40)
  base.update(kw)
  return P.PipelineConfig(**base)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_decode_and_augment_outputs_and_skips():
  src, cfg = FakeSource(), _cfg()
  rng = np.random.default_rng(0)
  reasons = {i: P.decode_and_augment(src[i], rng, cfg) for i in (0, 1, 2, 9, 19, 29, 39)}
  for i in (0, 1, 2):  # JPEG, PNG, array
    ex = reasons[i]
    assert ex['global'].shape == (2, G, G, 3) and ex['global'].dtype == np.uint8
    assert ex['local'].shape == (6, L, L, 3) and ex['local'].dtype == np.uint8
    assert ex['text'].shape == (8, 77) and ex['text'].dtype == np.int32
    assert ex['key'] == f'rec{i:04d}'
  assert 'UnidentifiedImageError' in reasons[9].reason
  assert ' at 0x' not in reasons[9].reason  # reasons go into the state: no addresses
  assert 'truncated' in reasons[19].reason.lower()
  assert 'EmptyCaptionError' in reasons[29].reason
  assert 'tar member unreadable' in reasons[39].reason
  assert all(isinstance(reasons[i], P.Skip) for i in (9, 19, 29, 39))
  assert isinstance(P.decode_and_augment({'key': 'k', 'image': b'', 'meta': 'not a dict'},
                                         rng, cfg), P.Skip)


def test_same_rng_same_example():
  src, cfg = FakeSource(), _cfg()
  a = P.decode_and_augment(src[1], np.random.default_rng(5), cfg)
  b = P.decode_and_augment(src[1], np.random.default_rng(5), cfg)
  for k in ('global', 'local', 'text'):
    np.testing.assert_array_equal(a[k], b[k])


def test_one_epoch_counts_full_batches(caplog):
  src = FakeSource()  # 40 records, 4 bad, 36 good
  it = P.make_train_iterator(src, _cfg(global_batch_size=5, num_epochs=1),
                             shard_index=0, shard_count=1)
  with caplog.at_level(logging.WARNING):
    batches = list(it)
  assert len(batches) == 7  # 36 // 5; the partial batch is dropped
  for b in batches:
    assert b['global'].shape == (5, 2, G, G, 3) and b['global'].dtype == np.uint8
    assert b['local'].shape == (5, 6, L, L, 3) and b['local'].dtype == np.uint8
    assert b['text'].shape == (5, 8, 77) and b['text'].dtype == np.int32
    assert b['keys'].shape == (5,)
  keys = np.concatenate([b['keys'] for b in batches])
  assert len(set(keys)) == 35 and set(keys) <= src.good_keys()
  stats = it.stats()
  assert (stats['seen'], stats['skipped']) == (40, 4)
  assert sorted(k for k, _ in stats['last_bad']) == ['rec0009', 'rec0019', 'rec0029',
                                                     'rec0039']
  assert 'rec0019' in caplog.text
  it.close()


def test_keep_remainder():
  it = P.make_train_iterator(FakeSource(), _cfg(global_batch_size=5, num_epochs=1,
                                                drop_remainder=False),
                             shard_index=0, shard_count=1)
  sizes = [len(b['keys']) for b in it]
  assert sizes == [5] * 7 + [1]


def test_deterministic_and_seed_dependent():
  src = FakeSource()
  a = _take(P.make_train_iterator(src, _cfg(seed=1), shard_index=0, shard_count=1), 4)
  b = _take(P.make_train_iterator(src, _cfg(seed=1, read_threads=3), shard_index=0,
                                  shard_count=1), 4)
  _assert_batches_equal(a, b)
  c = _take(P.make_train_iterator(src, _cfg(seed=2), shard_index=0, shard_count=1), 4)
  assert [list(x['keys']) for x in a] != [list(x['keys']) for x in c]


def test_two_epochs_each_record_twice_new_order_new_crops():
  src = FakeSource()
  it = P.make_train_iterator(src, _cfg(num_epochs=2), shard_index=0, shard_count=1)
  batches = list(it)
  assert len(batches) == 18  # 72 good / 4
  keys = list(np.concatenate([b['keys'] for b in batches]))
  first, second = keys[:36], keys[36:]
  assert set(first) == set(second) == src.good_keys()
  assert len(set(first)) == 36 and first != second
  crops = {}
  for b in batches:
    for k, g in zip(b['keys'], b['global']):
      crops.setdefault(k, []).append(g)
  assert all(not np.array_equal(*v) for v in crops.values())  # fresh augmentation
  assert it.stats()['skipped'] == 8


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_is_exact(workers):
  src = FakeSource()
  cfg = _cfg(seed=3, worker_count=workers)
  reference_it = P.make_train_iterator(src, _cfg(seed=3), shard_index=0, shard_count=1)
  reference = _take(reference_it, 12)  # past the first epoch (9 batches)
  it = P.make_train_iterator(src, cfg, shard_index=0, shard_count=1)
  head = _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  resumed = P.make_train_iterator(src, cfg, shard_index=0, shard_count=1)
  resumed.set_state(state)
  tail = _take(resumed, 7)
  _assert_batches_equal(head + tail, reference)  # workers change nothing either
  assert resumed.stats() == reference_it.stats()
  resumed.close()


def test_workers_start_in_a_program_that_is_not_an_absl_app():
  """A fresh process (no absl.app.run, no test harness) takes a batch through grain workers."""
  code = textwrap.dedent("""
      from cosmos_jax.data import augment, pipeline, sources
      source = sources.open_source('synthetic:train', image_size=32, num_train=8, num_val=4)
      cfg = pipeline.PipelineConfig(
          global_batch_size=4, worker_count=1,
          multicrop=augment.MultiCropConfig(global_size=32, local_size=16))
      it = pipeline.make_train_iterator(source, cfg, shard_index=0, shard_count=1)
      print(next(it)['global'].shape, flush=True)
      it.close()
  """)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '(4, 2, 32, 32, 3)' in out.stdout


def test_resume_with_other_worker_count():
  src = FakeSource()
  it = P.make_train_iterator(src, _cfg(), shard_index=0, shard_count=1)
  reference = _take(it, 6)
  it = P.make_train_iterator(src, _cfg(), shard_index=0, shard_count=1)
  _take(it, 2)
  state = it.get_state()
  resumed = P.make_train_iterator(src, _cfg(worker_count=1, read_threads=2),
                                  shard_index=0, shard_count=1)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), reference[2:])
  resumed.close()


def test_set_state_rejects_other_pipeline():
  src = FakeSource()
  state = P.make_train_iterator(src, _cfg(), shard_index=0, shard_count=2).get_state()
  other = P.make_train_iterator(src, _cfg(), shard_index=1, shard_count=2)
  with pytest.raises(ValueError, match="'shard_index': 0.*'shard_index': 1"):
    other.set_state(state)
  more = P.make_train_iterator(FakeSource(n=44), _cfg(), shard_index=0, shard_count=2)
  with pytest.raises(ValueError, match="'num_records': 40.*'num_records': 44"):
    more.set_state(state)
  longer = P.make_train_iterator(src, _cfg(num_epochs=3), shard_index=0, shard_count=2)
  longer.set_state(state)  # num_epochs only cuts the stream: allowed


def test_hosts_disjoint_and_complete():
  src = FakeSource()
  keys = []
  for index in range(2):
    it = P.make_train_iterator(src, _cfg(num_epochs=1, drop_remainder=False),
                               shard_index=index, shard_count=2)
    batches = list(it)
    assert all(len(b['keys']) == 2 for b in batches[:-1])  # per-host batch 4 // 2
    keys.append(set(np.concatenate([b['keys'] for b in batches])))
  assert not keys[0] & keys[1]
  assert keys[0] | keys[1] == src.good_keys()


def test_host_streams_interleave_to_global_stream():
  # Odd length: host epochs differ by one, yet every epoch is split disjointly and fully.
  src, cfg = FakeSource(n=9, bad_every=0), _cfg(num_epochs=3, shuffle=True)
  whole = P.host_dataset(src, cfg, 0, 1)
  hosts = [P.host_dataset(src, cfg, i, 2) for i in range(2)]
  assert len(hosts[0]) + len(hosts[1]) == len(whole) == 27
  for pos in range(27):
    a, b = whole[pos], hosts[pos % 2][pos // 2]
    assert a['key'] == b['key']
    np.testing.assert_array_equal(a['local'], b['local'])
  for epoch in range(3):
    keys = [whole[epoch * 9 + j]['key'] for j in range(9)]
    assert sorted(keys) == sorted(f'rec{i:04d}' for i in range(9))


def test_too_many_bad_samples():
  cfg = _cfg(max_bad_fraction=0.05, min_samples_before_check=10)
  it = P.make_train_iterator(FakeSource(bad_every=2), cfg, shard_index=0, shard_count=1)
  with pytest.raises(P.TooManyBadSamplesError,
                     match=r'\d+ of 10 samples skipped(.|\n)*rec00\d\d'):
    _take(it, 3)


def test_batch_not_divisible_by_hosts():
  with pytest.raises(ValueError, match='global_batch_size 6 .* hosts 4'):
    P.make_train_iterator(FakeSource(), _cfg(global_batch_size=6), shard_index=0,
                          shard_count=4)


def test_config_validation():
  with pytest.raises(ValueError):
    _cfg(num_epochs=0)
  with pytest.raises(ValueError):
    _cfg(max_bad_fraction=2.0)
  assert P.PipelineConfig(global_batch_size=8).textcrop == captions.TextCropConfig()


def _write_shard(path, start, n, bad=()):
  with tarfile.open(path, 'w') as tar:
    for i in range(start, start + n):
      members = {}
      array = np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)
      members['jpg'] = b'not a jpeg' if i in bad else _encode(array, 'JPEG')
      if i != start + n - 1:  # the last sample of each shard has no json
        members['json'] = json.dumps({'raw_caption': [f'image {i}'],
                                      'longSV_captions': [f'a long one {i}', 'two']}).encode()
      for ext, data in members.items():
        info = tarfile.TarInfo(f'{i:06d}.{ext}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_real_tar_shards_through_open_source(tmp_path):
  for s in range(2):
    _write_shard(tmp_path / f'part-{s:04d}.tar', 6 * s, 6, bad={2})
  src = sources.open_source(str(tmp_path / 'part-{0000..0001}.tar'))
  assert len(src) == 12
  cfg = _cfg(num_epochs=1, global_batch_size=3, worker_count=1, max_bad_fraction=0.5)
  it = P.make_train_iterator(src, cfg, shard_index=0, shard_count=1)
  batches = list(it)
  it.close()
  assert len(batches) == 3 and all(b['text'].shape == (3, 8, 77) for b in batches)
  assert (it.stats()['seen'], it.stats()['skipped']) == (12, 3)  # 1 bad jpg, 2 no json
  keys = sorted(np.concatenate([b['keys'] for b in batches]))
  assert keys[0] == 'part-0000.tar/000000' and len(keys) == 9


def test_synthetic_source():
  from cosmos_jax.data.synthetic import SyntheticConfig
  src = sources.open_source('synthetic', config=SyntheticConfig(image_size=40, num_train=8))
  it = P.make_train_iterator(src, _cfg(num_epochs=1), shard_index=0, shard_count=1)
  batches = list(it)
  assert len(batches) == 2 and it.stats()['skipped'] == 0
  assert batches[0]['global'].shape == (4, 2, G, G, 3)


def test_damaged_shards_counted_in_the_pipeline(tmp_path, caplog):
  """A shard cut after 2 of 6 samples: its 4 lost samples (known from sizes.json) are named."""
  for s in range(3):
    _write_shard(tmp_path / f'part-{s:04d}.tar', 6 * s, 6)
  whole = (tmp_path / 'part-0001.tar').read_bytes()
  with tarfile.open(tmp_path / 'part-0001.tar') as tar:
    third = tar.getmembers()[4]  # 000008.jpg: samples 000006 and 000007 end before it
  (tmp_path / 'part-0001.tar').write_bytes(whole[:third.offset_data + 5])
  (tmp_path / 'sizes.json').write_text(json.dumps({f'part-{s:04d}.tar': 6 for s in range(3)}))
  src = sources.open_source(str(tmp_path / 'part-{0000..0002}.tar'))
  assert len(src) == 6 + 3 + 6 and src.missing_records == 3
  with pytest.raises(P.TooManyBadSamplesError, match=r'3 of the 18 samples .*/part-0001\.tar: truncated'):
    P.make_train_iterator(src, _cfg(max_bad_fraction=0.1), shard_index=0, shard_count=1)
  with caplog.at_level(logging.WARNING):
    it = P.make_train_iterator(src, _cfg(num_epochs=1, global_batch_size=3, max_bad_fraction=0.5),
                               shard_index=0, shard_count=1)
  assert '1 damaged part(s), 3 samples missing' in caplog.text
  list(it)
  stats = it.stats()
  # 15 records: the cut one and the last (no json) of the two whole shards are skipped as read.
  assert (stats['seen'], stats['skipped']) == (15, 1 + 2)
  assert (stats['source_missing'], stats['source_bad_parts']) == (3, 1)
  it.close()


def test_empty_source_names_its_shards(tmp_path):
  (tmp_path / 'only.tar').write_bytes(b'')
  src = sources.open_source(str(tmp_path / 'only.tar'))
  with pytest.raises(ValueError) as e:
    P.make_train_iterator(src, _cfg(), shard_index=0, shard_count=1)
  message = str(e.value)
  assert f'the source {tmp_path / "only.tar"} has 0 records, fewer than the 1 hosts' in message
  assert 'empty file (0 bytes)' in message
