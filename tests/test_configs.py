"""configs/: every recipe loads, validates and has the reference's numbers (spec 2.1, 4.1)."""

import ast
import glob
import os

import pytest

from cosmos_jax import config as config_lib
from cosmos_jax import config_cli
from cosmos_jax.data.sources.tar import expand_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
NAMES = [os.path.basename(p)[:-3] for p in CONFIG_FILES]

# Written out from the spec, not computed: (global batch, steps per epoch, total steps,
# EMA momentum, text mode, variant, number of tar shards in data.train).
REFERENCE = {
    'cc3m_vitb16': (1024, 2768, 88_576, 0.999, 'textcrop', 'ViT-B-16', 576),
    'cc12m_vitb16': (4096, 2448, 78_336, 0.99, 'textcrop', 'ViT-B-16', 2176),
    'yfcc15m_vitb16': (4096, 3440, 110_080, 0.99, 'textcrop', 'ViT-B-16', 3637),
    'merged30m_vitb16': (4096, 6576, 210_432, 0.99, 'textcrop', 'ViT-B-16', 575 + 2176 + 3637),
    'pixelprose_vitb16': (4096, 3680, 117_760, 0.99, 'textcrop_pixelprose', 'ViT-B-16', 1700),
    'merged30m_vitb32': (4096, 6576, 210_432, 0.99, 'textcrop', 'ViT-B-32', 575 + 2176 + 3637),
}


def _load(name, arg=''):
  return config_cli.load_config_file(
      os.path.join(ROOT, 'configs', f'{name}.py') + (f':{arg}' if arg else ''))


def test_every_recipe_is_listed():
  recipes = {n for n in NAMES if n != 'demo' and not n.startswith('_')}
  assert recipes == set(REFERENCE)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('arg', ['', 'clip'])
def test_loads_and_validates(name, arg):
  c = _load(name, arg)
  config_lib.validate(c)
  assert c.model.cosmos == (arg != 'clip')
  if arg == 'clip':
    assert c.eval.which == 'student'
    assert c.total_steps == _load(name).total_steps   # the same budget


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_reference_numbers(name):
  batch, epoch, total, momentum, text_mode, variant, num_shards = REFERENCE[name]
  c = _load(name)
  assert (c.batch_size, c.total_steps, c.eval.every_steps) == (batch, total, epoch)
  assert total == 32 * epoch
  assert c.ema.momentum == momentum and c.ema.schedule == 'fixed'
  assert (c.data.text_mode, c.model.variant) == (text_mode, variant)
  o = c.optim
  assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.warmup_steps, o.grad_clip_norm) == (
      5e-4, 0.9, 0.98, 1e-8, 0.5, 2000, 0.0)
  d = c.data
  assert (d.global_size, d.local_size, d.num_local) == (224, 96, 6)
  assert tuple(d.global_scale) == (0.4, 1.0)
  assert c.eval.tasks == ('retrieval:coco=/data/coco',)
  assert 0 < c.checkpoint.every_steps <= epoch
  # The layout docs/tpu_recipes.md compiled: state and batch sharded over every device.
  assert (tuple(c.mesh.shape), c.mesh.preset, tuple(c.mesh.rules)) == ((1, -1, 1), 'fsdp', ())
  assert len(expand_shards(c.data.train, check_exists=False)) == num_shards


def test_merged30m_skips_cc3m_shard_0000():
  shards = expand_shards(_load('merged30m_vitb16').data.train, check_exists=False)
  cc3m = [s for s in shards if 'cc3m-train' in s]
  assert cc3m[0].endswith('cc3m-train-0001.tar') and cc3m[-1].endswith('cc3m-train-0575.tar')


def test_steps_per_epoch_formula():
  # Sample counts of the train scripts -> steps per epoch (spec 2.1, 2.4).
  for samples, batch, epoch in [(2_823_019, 1024, 2768), (10_010_225, 4096, 2448),
                                (14_065_827, 4096, 3440), (26_899_071, 4096, 6576),
                                (15_037_386, 4096, 3680)]:
    assert config_lib.reference_steps_per_epoch(samples, batch) == epoch


def test_unknown_arg_is_an_error():
  with pytest.raises(ValueError, match='unknown recipe argument'):
    _load('cc3m_vitb16', 'clp')


@pytest.mark.parametrize('path', CONFIG_FILES, ids=NAMES)
def test_docstring_has_launch_command(path):
  with open(path) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  assert doc and f'cosmos-jax train --config configs/{os.path.basename(path)}' in doc
