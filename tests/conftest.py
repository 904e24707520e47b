"""Test setup: 8 fake CPU devices (set before JAX initialises) and shared fixtures."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (must come after the flags above)
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_configure(config):
  # grain's worker processes read absl flags; pytest never parses them.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope='session')
def torch_modules():
  """torch and open_clip, imported once; the parity tests need real PyTorch."""
  torch = pytest.importorskip('torch')
  open_clip = pytest.importorskip('open_clip')
  torch.manual_seed(0)
  return torch, open_clip
