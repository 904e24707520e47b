"""glibc malloc settings for XLA:CPU's per-step buffers, set by re-executing the CLI once.

Only for ``train``, ``bench`` and ``demo`` on a host with no accelerator, and only where
``perf.cpu_tuning`` (the run's config file or ``--config.perf.cpu_tuning=...``) is not 'off'
('on' forces it). Whether the host has an accelerator is read from its device files and the
environment, before JAX (or any of its backends) is imported: see ``accelerator_on_host``.

XLA:CPU allocates each step's temporaries with malloc from its worker threads: one block of
about 280 MB for the tiny config at batch 32 (GBs for ViT-B/16) and many of 1-32 MB inside the
kernels. With glibc's defaults every step gets fresh pages from the kernel for most of them
(118k page faults per ViT-B/16 step), which the kernel zeroes before the step can touch them:

  * ``glibc.malloc.mmap_threshold=32 MiB`` (fixed): blocks below it come from malloc's arenas
    instead of a fresh mmap; the default threshold starts at 128 KiB and only rises as blocks
    are freed, and moves again with every size it sees.
  * ``glibc.malloc.trim_threshold=4 GiB``: freed arena memory stays mapped for the next step
    instead of being returned to the kernel (and faulted in again).
  * ``glibc.malloc.hugetlb=1`` (where transparent huge pages are not disabled): blocks above
    the threshold, which glibc maps afresh each time, fault in 2 MiB pages, not 4 KiB ones.
  * ``native/block_cache.c``, preloaded where a C compiler is found (built once into
    ``~/.cache/cosmos_jax``): keeps a few freed blocks of 64 MiB or more for the next step,
    since no tunable keeps glibc from unmapping them.

On a 2-core CPU they took the ViT-B/16 step from 7.6 to 5.5-5.9 s (the tunables; faults from
118k to 1.4k per step) and the tiny step from 0.23 to 0.17 s (the tunables) and 0.145 s (the
block cache). Tunables are read when a process starts, hence the re-exec (glibc >= 2.35).
A tunable the caller set is left as it is. ``COSMOS_JAX_NO_MALLOC_TUNING=1`` opts out of all
of it, whatever the config says.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

HUGE_PAGES = 'glibc.malloc.hugetlb=1'
ARENA_TUNABLES = ('glibc.malloc.mmap_threshold=33554432',
                  'glibc.malloc.trim_threshold=4294967296')
OPT_OUT = 'COSMOS_JAX_NO_MALLOC_TUNING'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
BLOCK_CACHE_SOURCE = Path(__file__).with_name('native') / 'block_cache.c'
# Set by the parent before the re-exec (so there is one), and so that a subprocess the child
# starts (the official PyTorch timer) can run in the caller's environment.
CALLER_VARS = {'GLIBC_TUNABLES': 'COSMOS_JAX_CALLER_GLIBC_TUNABLES',
               'LD_PRELOAD': 'COSMOS_JAX_CALLER_LD_PRELOAD'}


def _glibc_version() -> tuple[int, ...]:
  lib, version = platform.libc_ver()
  if lib != 'glibc' or not version:
    return ()
  return tuple(int(p) for p in version.split('.')[:2] if p.isdigit())


def _thp_available() -> bool:
  try:
    with open(THP_SETTING) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def _set_tunables() -> list[str]:
  return [t for t in os.environ.get('GLIBC_TUNABLES', '').split(':') if t]


def huge_pages_active() -> bool:
  return HUGE_PAGES in _set_tunables()


def arena_tuning_active() -> bool:
  return all(t in _set_tunables() for t in ARENA_TUNABLES)


def wanted_tunables() -> list[str]:
  """The tunables to add: those the caller has not set (by name) already."""
  wanted = list(ARENA_TUNABLES) + ([HUGE_PAGES] if _thp_available() else [])
  names = {t.split('=')[0] for t in _set_tunables()}
  return [t for t in wanted if t.split('=')[0] not in names]


def block_cache_active() -> bool:
  return 'block_cache-' in os.environ.get('LD_PRELOAD', '')


def _cache_dir() -> Path:
  return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'cosmos_jax'


def block_cache_library() -> Optional[str]:
  """The compiled ``native/block_cache.c`` (built on first use), or None without a compiler."""
  source = BLOCK_CACHE_SOURCE.read_bytes()
  tag = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:12]
  library = _cache_dir() / f'block_cache-{tag}.so'
  if library.exists():
    return str(library)
  compiler = shutil.which(os.environ.get('CC') or 'cc')
  if not compiler:
    return None
  # Unique per host and process: nodes sharing a $HOME may build at the same time.
  partial = library.with_name(f'{library.name}.{platform.node()}.{os.getpid()}.'
                              f'{os.urandom(4).hex()}.partial')
  try:
    library.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([compiler, '-O2', '-shared', '-fPIC', '-o', str(partial),
                    str(BLOCK_CACHE_SOURCE), '-ldl', '-lpthread'],
                   check=True, capture_output=True, timeout=120)
    os.replace(partial, library)   # atomic: concurrent first runs never load half a file
  except (OSError, subprocess.SubprocessError):
    partial.unlink(missing_ok=True)
    return None
  return str(library)


TUNED_COMMANDS = ('train', 'bench', 'demo')
# Device files of accelerators JAX drives: NVIDIA GPUs, TPU chips (v4 and later expose
# /dev/accel*, v5e/v6e VFIO groups), AMD GPUs.
ACCELERATOR_DEVICE_FILES = ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*',
                            '/dev/kfd')
# Set by the TPU and GPU runtimes and schedulers that hand a process its accelerators.
ACCELERATOR_ENV = ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_ID', 'CUDA_VISIBLE_DEVICES',
                   'ROCR_VISIBLE_DEVICES', 'SLURM_JOB_GPUS')


def accelerator_on_host(env: Optional[dict] = None) -> Optional[str]:
  """What makes this host an accelerator host (a device file, a variable), or None.

  Read without importing JAX, so that the decision comes before any backend starts: the
  same reason ``train/distributed.py`` asks JAX's import-time TPU check, not its backends.
  """
  env = os.environ if env is None else env
  platforms = env.get('JAX_PLATFORMS', '').strip().lower()
  if platforms and 'cpu' not in platforms.split(','):
    return f'JAX_PLATFORMS={platforms}'
  for name in ACCELERATOR_ENV:
    value = env.get(name, '').strip()
    if value and value not in ('-1', 'NoDevFiles', 'none'):
      return f'{name}={value}'
  for pattern in ACCELERATOR_DEVICE_FILES:
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  return None


def cpu_tuning_requested(argv: Sequence[str]) -> str:
  """``perf.cpu_tuning`` of the command line: an override if given, else the config file's
  (read without JAX); 'auto' where neither says (or the file cannot be read: the command
  itself will report that)."""
  args = list(argv)
  for i, arg in enumerate(args):
    if arg.startswith('--config.perf.cpu_tuning'):
      value = arg.split('=', 1)[1] if '=' in arg else (args[i + 1] if i + 1 < len(args) else '')
      return value.strip('\'"')
  for i, arg in enumerate(args):
    spec = arg.split('=', 1)[1] if arg.startswith('--config=') else (
        args[i + 1] if arg == '--config' and i + 1 < len(args) else None)
    if spec:
      try:
        from cosmos_jax import config_cli   # ml_collections only: no JAX
        return str(config_cli.load_config_file(spec).perf.cpu_tuning)
      except Exception:   # pylint: disable=broad-except  (reported by the command itself)
        return 'auto'
  return 'auto'


def should_reexec(argv: Sequence[str] = ()) -> bool:
  """True for the tuned commands on Linux with glibc >= 2.35 and no accelerator (or
  ``perf.cpu_tuning='on'``), unless re-executed already, opted out or switched off."""
  if not argv or argv[0] not in TUNED_COMMANDS:
    return False
  if (not sys.platform.startswith('linux') or os.environ.get(OPT_OUT, '') not in ('', '0')
      or CALLER_VARS['GLIBC_TUNABLES'] in os.environ or _glibc_version() < (2, 35)):
    return False
  mode = cpu_tuning_requested(argv[1:])
  if mode == 'off':
    return False
  return mode == 'on' or accelerator_on_host() is None


def caller_environment() -> dict[str, str]:
  """os.environ as the caller had it, before the re-exec added the tunables and preload."""
  env = dict(os.environ)
  for name, saved in CALLER_VARS.items():
    if saved in env:
      original = env.pop(saved)
      if original:
        env[name] = original
      else:
        env.pop(name, None)
  return env


def reexec_with_malloc_tuning(argv: Sequence[str]) -> None:
  """Replaces this process by ``python -m cosmos_jax.cli argv`` with the tunables (and the
  block cache, where it builds) added.

  Returns (doing nothing) where it does not apply; the child sees the marker and goes on.
  """
  if not should_reexec(argv):
    return
  env = dict(os.environ)
  for name, saved in CALLER_VARS.items():
    env[saved] = env.get(name, '')
  env['GLIBC_TUNABLES'] = ':'.join(_set_tunables() + wanted_tunables())
  library = block_cache_library()
  if library:
    env['LD_PRELOAD'] = ':'.join(filter(None, [library, env.get('LD_PRELOAD', '')]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, '-m', 'cosmos_jax.cli', *argv], env)


def rehome_state(tree):
  """The train state's arrays copied from this thread, on one CPU process with huge pages on.

  Arrays that a jitted initialisation, a checkpoint restore or compilation's own allocations
  leave behind come from the malloc arenas of XLA's worker threads, which the hugetlb tunable
  leaves on 4 KiB pages (18-31% of a ViT-B/16 state was on 2 MiB pages); copies made from the
  main thread after compilation come from the main heap, which it backs with huge pages (100%;
  93% when copied before compiling). The step donates the state and updates it in place, so
  where it lies then is where it stays: about 2% of a step, B/16 and tiny (alternating runs).
  Both copies exist for a moment. Anything else (an accelerator, several processes, no
  tunable) gets the tree back as it is.
  """
  import jax   # here: this module is imported before JAX by the CLI and the official timer

  if (jax.default_backend() != 'cpu' or jax.process_count() > 1
      or not huge_pages_active()):
    return tree
  return jax.block_until_ready(jax.tree.map(lambda a: a.copy(), tree))
