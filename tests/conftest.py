"""Test setup: 8 fake CPU devices (set before JAX initialises) and shared fixtures.

One persistent compilation cache per test run, shared by the xdist workers and the processes
the tests start (through the environment): the loop's tests compile the same tiny step many
times, in-process and in real trainer processes. It is new for every run, so every program is
still compiled at least once by the run that tests it.
"""

import os
import shutil
import subprocess
import sys
import tempfile

# The suite's time is mostly XLA:CPU compiling small programs it runs a few times. Two flags
# cut it without changing any float semantics (no fast-math either way): LLVM at -O0 (33 -> 25
# min on 2 cores) and, where this XLA still has them (jaxlib 0.10; newer ones dropped the flag
# and abort on it), the elemental emitters for fusions instead of the MLIR fusion emitters (the
# tiny COSMOS step: 24-30 s -> 16-21 s of compile). Every test passes with the defaults too:
# XLA_FLAGS given by the caller replaces these
# (`XLA_FLAGS=--xla_force_host_platform_device_count=8 make test`). The xdist workers and the
# processes a test starts inherit the controller's flags (bench.memory.cpu_devices_env): all
# compile the same way, and only the controller asks XLA about the flag.
_ELEMENTAL_EMITTERS = '--xla_cpu_use_fusion_emitters=false'


def _xla_accepts(flag: str) -> bool:
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env,
                        capture_output=True).returncode == 0


if 'XLA_FLAGS' not in os.environ:
  os.environ['XLA_FLAGS'] = ' '.join(
      ['--xla_force_host_platform_device_count=8', '--xla_backend_optimization_level=0']
      + ([_ELEMENTAL_EMITTERS] if _xla_accepts(_ELEMENTAL_EMITTERS) else []))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID') or f'pid{os.getpid()}'
_CACHE = os.path.join(tempfile.gettempdir(), f'cosmos_jax_test_compile_cache_{_RUN}')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')

import jax  # noqa: E402  (must come after the flags above)
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_collection_modifyitems(items):
  # The long tests first (the rest keep their order), so that no worker is left running one
  # alone at the end. Every xdist worker sorts the same way, as the controller requires.
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)


def pytest_sessionfinish(session):
  if not os.environ.get('PYTEST_XDIST_WORKER'):   # the controller, after every worker
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def torch_modules():
  """torch and open_clip, imported once; the parity tests need real PyTorch."""
  torch = pytest.importorskip('torch')
  open_clip = pytest.importorskip('open_clip')
  torch.manual_seed(0)
  return torch, open_clip
