"""glibc malloc settings for XLA:CPU's per-step buffers, set by re-executing the CLI once.

XLA:CPU allocates each step's temporaries with malloc from its worker threads: one block of
about 280 MB for the tiny config at batch 32 (GBs for ViT-B/16) and many of 1-32 MB inside the
kernels. With glibc's defaults every step gets fresh pages from the kernel for most of them
(118k page faults per ViT-B/16 step), which the kernel zeroes before the step can touch them:

  * ``glibc.malloc.mmap_threshold=32 MiB`` (fixed): blocks below it come from malloc's arenas
    instead of a fresh mmap; the default threshold starts at 128 KiB and only rises as blocks
    are freed, and moves again with every size it sees.
  * ``glibc.malloc.trim_threshold=4 GiB``: freed arena memory stays mapped for the next step
    instead of being returned to the kernel (and faulted in again).
  * ``glibc.malloc.hugetlb=1`` (glibc >= 2.35; where transparent huge pages are not disabled):
    blocks above the threshold, which glibc always maps afresh from a worker thread, fault in
    2 MiB pages instead of 4 KiB ones.

On a 2-core CPU they took the ViT-B/16 step from 7.6 to 5.6-5.9 s (faults 1.4k per step) and
the tiny step from 0.23 to 0.17 s. Tunables are read when a process starts, hence the re-exec.
A tunable the caller set already is left as it is. Accelerator runs are unaffected (their
buffers live on the device); ``COSMOS_JAX_NO_MALLOC_TUNING=1`` opts out.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Sequence

HUGE_PAGES = 'glibc.malloc.hugetlb=1'
ARENA_TUNABLES = ('glibc.malloc.mmap_threshold=33554432',
                  'glibc.malloc.trim_threshold=4294967296')
OPT_OUT = 'COSMOS_JAX_NO_MALLOC_TUNING'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
# Set by the parent before the re-exec, so the child (and a subprocess it starts, such as the
# official PyTorch timer) can tell what the caller's environment was.
ORIGINAL = 'COSMOS_JAX_CALLER_GLIBC_TUNABLES'


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


def should_reexec() -> bool:
  """True on Linux with glibc >= 2.35 while a wanted tunable is missing, unless opted out."""
  return (sys.platform.startswith('linux') and os.environ.get(OPT_OUT, '') in ('', '0')
          and _glibc_version() >= (2, 35) and bool(wanted_tunables()))


def caller_environment() -> dict[str, str]:
  """os.environ as the caller had it, before the re-exec added the tunables."""
  env = dict(os.environ)
  if ORIGINAL in env:
    original = env.pop(ORIGINAL)
    if original:
      env['GLIBC_TUNABLES'] = original
    else:
      env.pop('GLIBC_TUNABLES', None)
  return env


def reexec_with_malloc_tuning(argv: Sequence[str]) -> None:
  """Replaces this process by ``python -m cosmos_jax.cli argv`` with the tunables added.

  Returns (doing nothing) where it does not apply; the child sees the tunables and goes on.
  """
  if not should_reexec():
    return
  env = dict(os.environ)
  env[ORIGINAL] = env.get('GLIBC_TUNABLES', '')
  env['GLIBC_TUNABLES'] = ':'.join(_set_tunables() + wanted_tunables())
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, '-m', 'cosmos_jax.cli', *argv], env)
