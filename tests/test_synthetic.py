"""Tests of the embedded synthetic dataset (cosmos_jax.data.synthetic)."""

import dataclasses
import io
import itertools
import json
import os
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from cosmos_jax.data import synthetic
from cosmos_jax.data.synthetic import (SyntheticConfig, SyntheticDataset, render_scene,
                                       shard_pattern, write_tar_shards)
from cosmos_jax.data.synthetic_text import BACKGROUND_WORDS, CAPTION_FIELDS

CFG = SyntheticConfig(image_size=64, num_train=128, num_val=48, seed=3)


def dataclass_replace(**kw) -> SyntheticConfig:
  return dataclasses.replace(CFG, **kw)


@pytest.fixture(scope='module')
def train():
  ds = SyntheticDataset(CFG, 'train')
  return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope='module')
def val():
  ds = SyntheticDataset(CFG, 'val')
  return [ds[i] for i in range(len(ds))]


def _same(a, b):
  assert a['key'] == b['key']
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['mask'], b['mask'])
  assert a['meta'] == b['meta']
  assert (a['label'], a['labels']) == (b['label'], b['labels'])


@pytest.mark.parametrize('split', ['train', 'val'])
def test_deterministic_and_order_independent(split):
  ds1, ds2 = SyntheticDataset(CFG, split), SyntheticDataset(CFG, split)
  idx = [0, 5, 6, 7, 13]
  forward = [ds1[i] for i in idx]
  backward = [ds2[i] for i in reversed(idx)][::-1]
  for a, b in zip(forward, backward):
    _same(a, b)
  other = SyntheticDataset(dataclass_replace(seed=4), split)[0]
  assert not np.array_equal(other['image'], forward[0]['image'])


def test_sample_format(train):
  x = train[0]
  assert x['image'].shape == (64, 64, 3) and x['image'].dtype == np.uint8
  assert x['mask'].shape == (64, 64) and x['mask'].dtype == np.uint8
  assert isinstance(x['label'], int) and x['label'] in x['labels']
  assert len(SyntheticDataset(CFG, 'train')) == 128
  with pytest.raises(IndexError):
    SyntheticDataset(CFG, 'val')[48]
  json.dumps(x['meta'])  # The meta is JSON-serialisable.


def test_scene_independent_of_resolution():
  small, big = (SyntheticDataset(dataclass_replace(image_size=s), 'val')[9] for s in (64, 160))
  assert small['meta'] == big['meta']


def test_splits_disjoint_and_keys_sort(train, val):
  tk, vk = [x['key'] for x in train], [x['key'] for x in val]
  assert not set(tk) & set(vk)
  assert tk == sorted(tk) and vk == sorted(vk)
  assert all('.' not in k for k in tk + vk)


def test_mask_agrees_with_image(train, val):
  colours = dict(CFG.colours)
  for x in train + val:
    objects = x['meta']['objects']
    ids = [CFG.shapes.index(o['shape']) for o in objects]
    assert set(np.unique(x['mask'])) - {0} == {i + 1 for i in x['labels']}
    assert set(x['labels']) == set(ids)  # Every object stays visible.
    for k in x['labels']:
      allowed = np.array([colours[o['colour']] for o, i in zip(objects, ids) if i == k])
      pix = x['image'][x['mask'] == k + 1]
      assert np.all((pix[:, None, :] == allowed[None]).all(-1).any(-1))
    _, mask, vis = render_scene(x['meta'], CFG)
    np.testing.assert_array_equal(mask, x['mask'])
    assert x['label'] == ids[int(np.argmax(vis.sum((1, 2))))]  # Largest visible.


def test_occlusion():
  obj = dict(size='large', position='center', cell=4)
  scene = dict(
      objects=[dict(obj, shape='square', colour='red', cx=0.45, cy=0.5, r=0.2),
               dict(obj, shape='circle', colour='blue', cx=0.55, cy=0.5, r=0.2)],
      background=dict(kind='stripes', colour='gray', period=0.1, orientation=0,
                      angle=0.0, noise_seed=0))
  image, mask, vis = render_scene(scene, CFG)
  full = synthetic.object_masks(scene['objects'], 64)
  overlap = full[0] & full[1]
  assert overlap.sum() > 100
  assert np.all(mask[overlap] == CFG.shapes.index('circle') + 1)
  assert np.all(image[overlap] == dict(CFG.colours)['blue'])
  assert vis[0].sum() == (full[0] & ~full[1]).sum() < full[0].sum()
  assert np.all(mask[vis[0]] == CFG.shapes.index('square') + 1)
  # A ring's hole shows what lies beneath it.
  scene['objects'][1].update(shape='ring', cx=0.45)
  _, mask, _ = render_scene(scene, CFG)
  assert mask[32, 28] == CFG.shapes.index('square') + 1


def test_captions(train, val):
  for x in train + val:
    meta = x['meta']
    for field in CAPTION_FIELDS:
      assert isinstance(meta[field], list) and meta[field]
      for s in meta[field]:
        assert isinstance(s, str) and s.strip() == s and s and '.' not in s
    assert len(meta['raw_caption']) == 1
    assert all(1 <= len(meta[f]) <= 2 for f in CAPTION_FIELDS if f.startswith('short'))
    bg = meta['background']
    adj, noun = BACKGROUND_WORDS[bg['kind']]
    texts = [meta['raw_caption'][0]] + [' '.join(meta[f]) for f in CAPTION_FIELDS
                                        if f.startswith('long')]
    for text in texts:
      assert bg['colour'] in text and (adj in text or noun in text)
      for o in meta['objects']:
        assert f"{o['colour']} {o['shape']}" in text
    for o in meta['objects']:  # Positions in the raw caption, sizes in the long ones.
      assert f"{o['colour']} {o['shape']} in the {o['position']}" in meta['raw_caption'][0]
      assert o['position'] == synthetic.position_name(o['cx'], o['cy'])
    if len(meta['objects']) > 1:
      assert any(r in ' '.join(meta['longIB_captions'])
                 for r in ('left of', 'right of', 'above', 'below'))


def test_near_duplicate_groups(val):
  g = CFG.group_size
  seen = set()
  for start in range(0, len(val), g):
    group = [x['meta'] for x in val[start:start + g]]
    assert len({m['group'] for m in group}) == 1
    varied = group[0]['varied']
    assert all(m['varied'] == varied for m in group)
    seen.add(varied['attribute'])
    k, attr = varied['object'], varied['attribute']
    assert len({m['raw_caption'][0] for m in group}) == g
    for a, b in itertools.combinations(group, 2):
      assert a['background'] == b['background']
      assert len(a['objects']) == len(b['objects'])
      for i, (oa, ob) in enumerate(zip(a['objects'], b['objects'])):
        diff = {f for f in ('shape', 'colour', 'size', 'position') if oa[f] != ob[f]}
        assert diff == ({attr} if i == k else set())
  assert seen == {'colour', 'shape', 'position'}


def test_small_objects(train):
  with_small = [x for x in train if any(o['size'] == 'small' for o in x['meta']['objects'])]
  assert 0.2 < len(with_small) / len(train) < 0.9
  _, _, vis = render_scene(with_small[0]['meta'], CFG)
  sizes = [o['size'] for o in with_small[0]['meta']['objects']]
  assert vis[sizes.index('small')].sum() < 0.03 * 64 * 64


def test_tar_shards(tmp_path):
  ds = SyntheticDataset(dataclass_replace(num_val=10), 'val')
  paths = write_tar_shards(ds, str(tmp_path), samples_per_shard=4)
  names = [f'synthetic-val-{i:04d}.tar' for i in range(3)]
  assert paths == [os.path.join(str(tmp_path), n) for n in names]
  assert sorted(os.listdir(tmp_path)) == names
  assert shard_pattern(str(tmp_path), 3, 'synthetic-val') == os.path.join(
      str(tmp_path), 'synthetic-val-{0000..0002}.tar')
  keys = []
  for path in paths:
    with tarfile.open(path) as tar:
      members = tar.getnames()
      assert members == sorted(members)
      files = {m: tar.extractfile(m).read() for m in members}
    for name in members[::3]:
      key = name.split('.')[0]
      assert [f'{key}.jpg', f'{key}.json', f'{key}.mask.png'] == sorted(
          m for m in members if m.split('.')[0] == key)
      keys.append(key)
      x = ds[int(key.split('_')[1])]
      record = json.loads(files[f'{key}.json'])
      assert record == dict(x['meta'], key=key, label=x['label'], labels=x['labels'])
      mask = np.asarray(Image.open(io.BytesIO(files[f'{key}.mask.png'])))
      np.testing.assert_array_equal(mask, x['mask'])
      image = np.asarray(Image.open(io.BytesIO(files[f'{key}.jpg'])).convert('RGB'))
      assert np.abs(image.astype(int) - x['image']).mean() < 4
  assert keys == [ds.key(i) for i in range(10)]


def test_class_names():
  ds = SyntheticDataset(CFG)
  assert ds.class_names() == list(CFG.shapes) and len(ds.class_names()) == 8
  background = ds.mask_class_names()[0]
  assert background == ('background, stripes, checkerboard pattern, speckled noise, '
                        'smooth gradient, polka dots')
  assert ds.mask_class_names()[1:] == list(CFG.shapes)
  # Each texture's word is what the captions of an image with that texture say.
  for kind, word in zip(synthetic.BACKGROUNDS, background.split(', ')[1:]):
    one = SyntheticDataset(dataclass_replace(backgrounds=(kind,)))
    assert word in ' '.join(one[0]['meta']['shortSV_captions'])
  assert {'circle', 'square', 'triangle', 'star', 'cross', 'ring', 'hexagon',
          'diamond'} == set(ds.class_names())


def test_generation_speed():
  ds = SyntheticDataset(CFG, 'val')
  ds[0]
  t = time.perf_counter()
  for i in range(32):
    ds[i]
  # About 1 ms on one core; loose bound for loaded machines.
  assert (time.perf_counter() - t) / 32 < 0.025


def test_run_config_fields_reach_training_and_evaluation():
  """A generator field set in a run config (here max_objects, colours given as JSON-like
  lists) is the same in the training source and in the in-loop evaluation's val split."""
  import ml_collections
  from cosmos_jax import config, models
  from cosmos_jax.train.evaluation import InLoopEval
  from cosmos_jax.train.from_config import open_train_source
  c = config.base_config()
  c.data.synthetic = ml_collections.ConfigDict(dict(
      image_size=32, num_train=16, num_val=8, max_objects=1,
      colours=[[name, list(rgb)] for name, rgb in synthetic.COLOURS[:4]]))
  c.eval.tasks = ('synthetic',)
  ev = InLoopEval(c, models.get_variant('tiny'), workdir='unused', mesh=None)
  trained = open_train_source(c).dataset.config
  assert ev.synthetic == trained
  assert ev.synthetic.max_objects == 1 and ev.synthetic.colours == synthetic.COLOURS[:4]
  val = SyntheticDataset(ev.synthetic, 'val')
  assert all(len(val[i]['meta']['objects']) == 1 for i in range(len(val)))
  with pytest.raises(ValueError, match='unknown data.synthetic fields'):
    synthetic.config_from_fields({'image_size': 32, 'max_object': 1})
