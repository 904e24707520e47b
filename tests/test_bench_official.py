"""The official PyTorch step timer; needs a checkout of ExplainableML/cosmos (no network in CI).

  COSMOS_OFFICIAL_REPO=/path/to/cosmos pytest tests/test_bench_official.py
"""

import math
import os

import pytest

REPO = os.environ.get('COSMOS_OFFICIAL_REPO')


@pytest.mark.skipif(not REPO, reason='set COSMOS_OFFICIAL_REPO to a checkout of the official code')
def test_official_tiny_step_runs(torch_modules):
  from cosmos_jax import config_cli
  from cosmos_jax.bench.official import time_official_step
  config = config_cli.load_config_file('configs/demo.py')
  config.batch_size = 8
  result = time_official_step(REPO, config, repeats=2)
  assert math.isfinite(result['official_step_s']) and result['official_step_s'] > 0
  assert result['official_samples_per_s'] == pytest.approx(8 / result['official_step_s'])
