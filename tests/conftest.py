"""Test setup: 8 fake CPU devices (set before JAX initialises) and shared fixtures.

One persistent compilation cache per test run, shared by the xdist workers and the processes
the tests start (through the environment): the loop's tests compile the same tiny step many
times, in-process and in real trainer processes. It is new for every run, so every program is
still compiled at least once by the run that tests it.
"""

import os
import shutil
import tempfile

# LLVM at -O0: the suite's time is mostly XLA:CPU compiling small programs it runs a few
# times (33 -> 25 min on 2 cores). It changes no float semantics (no fast-math at any level),
# and every test passes at the default level too: XLA_FLAGS given by the caller replaces this
# (`XLA_FLAGS=--xla_force_host_platform_device_count=8 make test`). The processes a test
# starts get the same flags (bench.memory.cpu_devices_env): compiled the same way.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                                   '--xla_backend_optimization_level=0')
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
