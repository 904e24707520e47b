"""What a checkpoint failure means, in one line: a full disk, another model, an unwritable workdir.

Pure helpers of ``checkpoint.py``: they read exceptions, trees and configs and write messages;
they never touch a checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from typing import Any, Callable, Optional

import jax
import numpy as np

from cosmos_jax.errors import UsageError

# Config sections that decide the state's tree; listed first when a resume does not fit.
_STRUCTURE_SECTIONS = ('model', 'optim', 'ema')


def as_dict(config: Any) -> Any:
  return config.to_dict() if hasattr(config, 'to_dict') else config


def first_line(e: BaseException, limit: int = 200) -> str:
  lines = str(e).strip().splitlines()
  text = lines[0][:limit] if lines else ''
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def is_disk_full(e: Optional[BaseException]) -> bool:
  """ENOSPC anywhere in the chain of causes (orbax and tensorstore wrap it in their own)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(s in str(e) for s in ('No space left', 'RESOURCE_EXHAUSTED', 'ENOSPC')):
      return True
    e = e.__cause__ or e.__context__
  return False


def gib(nbytes: float) -> str:
  return f'{nbytes / 2**30:.2f} GiB'


def tree_shapes(tree: Any, is_leaf: Optional[Callable[[Any], bool]] = None) -> dict[str, tuple]:
  """'a/b/0/c' -> shape for every leaf; namedtuple fields and dict keys read alike (orbax
  stores an optax state's namedtuples as dicts)."""
  def name(key: Any) -> str:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {'/'.join(name(k) for k in path): tuple(getattr(x, 'shape', ())) for path, x in flat}


def _flatten(d: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for key, value in d.items():
    out.update(_flatten(value, f'{prefix}{key}.' if isinstance(value, dict) else prefix + key))
  return out


def config_differences(saved: Optional[dict], now: Optional[dict]) -> list[str]:
  """'field: saved -> now' for every config field that differs, the model's sections first."""
  if not saved or not now:
    return []
  a, b = _flatten(as_dict(saved)), _flatten(json.loads(json.dumps(as_dict(now), default=str)))
  keys = [k for k in sorted(set(a) | set(b)) if a.get(k, '<absent>') != b.get(k, '<absent>')]
  keys.sort(key=lambda k: k.split('.')[0] not in _STRUCTURE_SECTIONS)
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}' for k in keys]


def nbytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, 'shape'))


def check_workdir_writable(workdir: str) -> str:
  """Creates ``workdir/checkpoints`` and writes a probe file in both, before any compile.

  Raises UsageError naming what is wrong: the workdir is a file, lies under a file, or a
  directory cannot be created or written (a read-only mount, missing permissions).
  """
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f'workdir {workdir} is a file, not a directory; give another --workdir')
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f'workdir {workdir} lies under {parent}, which is a file; give another '
                     '--workdir')
  for directory in (path, os.path.join(path, 'checkpoints')):
    try:
      os.makedirs(directory, exist_ok=True)
      with tempfile.TemporaryFile(dir=directory, prefix='.write-probe-'):
        pass
    except OSError as e:
      raise UsageError(f'{directory} is not writable ({e.strerror or e}); give a --workdir on '
                       'a writable disk') from e
  return path




def mismatch(saved_tree: Any, target: Any, saved_config: Callable[[], Optional[dict]],
             config: Any) -> Optional[str]:
  """None if the saved arrays have the target's paths and shapes, else what differs: how
  many arrays, one example, and the config fields that differ from the saved config."""
  saved = tree_shapes(saved_tree, is_leaf=lambda x: hasattr(x, 'shape'))
  wanted = tree_shapes(target)
  if saved == wanted:
    return None
  only_saved = sorted(set(saved) - set(wanted))
  only_wanted = sorted(set(wanted) - set(saved))
  reshaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
  if reshaped:
    example = f'{reshaped[0]} is {saved[reshaped[0]]} there, {wanted[reshaped[0]]} here'
  else:
    example = f'{only_saved[0]} only there' if only_saved else f'{only_wanted[0]} only here'
  diffs = config_differences(saved_config(), config)
  fields = ('; config fields that differ from the saved config: ' + ', '.join(diffs[:6])
            + (f' and {len(diffs) - 6} more' if len(diffs) > 6 else '')) if diffs else ''
  return (f'{len(only_saved) + len(only_wanted) + len(reshaped)} arrays differ, e.g. '
          f'{example}{fields}')
