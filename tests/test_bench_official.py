"""The official PyTorch step timer, run from a checkout of ExplainableML/cosmos.

Needs the checkout (CI has no network): set COSMOS_OFFICIAL_REPO to the folder holding its
``src/``. The official code also needs torch, timm and the rest of open_clip's dependencies.
"""

import math
import os

import pytest

REPO = os.environ.get('COSMOS_OFFICIAL_REPO')

needs_checkout = pytest.mark.skipif(
    not REPO or not os.path.isdir(os.path.join(REPO or '', 'src', 'open_clip')),
    reason='COSMOS_OFFICIAL_REPO does not point at a checkout of ExplainableML/cosmos')


@needs_checkout
@pytest.mark.slow
def test_official_tiny_step_times_are_finite_and_positive():
  pytest.importorskip('torch')
  from cosmos_jax import config_cli
  from cosmos_jax.bench import official

  config = config_cli.load_config_file(
      os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo.py'))
  config.batch_size = 4
  result = official.time_official_step(REPO, config, repeats=2)
  for key in ('official_step_s', 'official_samples_per_s', 'official_matmul_flops_per_s'):
    assert math.isfinite(result[key]) and result[key] > 0, (key, result)
  assert result['official_samples_per_s'] == pytest.approx(4 / result['official_step_s'])
  assert result['official_threads'] >= 1


def test_a_folder_without_the_official_code_is_refused(tmp_path):
  from cosmos_jax import config_cli
  from cosmos_jax.bench import official

  config = config_cli.load_config_file(
      os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo.py'))
  with pytest.raises(FileNotFoundError, match='not a checkout'):
    official.time_official_step(str(tmp_path), config)


@needs_checkout
@pytest.mark.slow
def test_official_augmentation_rate_beside_ours_on_the_same_jpegs(tmp_path):
  pytest.importorskip('torch')
  from cosmos_jax import config_cli
  from cosmos_jax.bench import augment_rate, data_pod

  config = config_cli.load_config_file(
      os.path.join(os.path.dirname(__file__), '..', 'configs', 'merged30m_vitb16.py'))
  _, paths = data_pod.write_shards(str(tmp_path), 4)
  jpegs = augment_rate.jpegs_in(paths)
  assert len(jpegs) == 4 * len(data_pod.IMAGE_SIZES)
  rates = augment_rate.augment_rates(jpegs, config, official_repo=REPO, repeats=1)
  for key in ('ours_augment_samples_per_s_per_core', 'official_augment_samples_per_s_per_core'):
    assert math.isfinite(rates[key]) and rates[key] > 0, rates
