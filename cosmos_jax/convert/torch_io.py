"""Reading and writing PyTorch checkpoints: `.pt`/`.pth`/`.bin` pickles and `.safetensors`.

Pickles are untrusted: they are read with `torch.load(weights_only=True)` only, so a file
that needs code to load (any class beyond tensors, numbers, strings and containers) is
refused and nothing in it runs.

Layouts written:
  * 'open_clip': the plain state dict, without the 21 COSMOS-only tensors (loads into
    `open_clip.create_model(...)` with `strict=True`).
  * 'cosmos': in a `.pt`, the official training-checkpoint dict
    `{'epoch', 'name', 'student': {'module.' + k}, 'teacher': {k}}`; in a `.safetensors`
    (a flat file), the keys `student.<k>` and `teacher.<k>`, with `epoch`, `name` and
    `layout` in the file's metadata.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from cosmos_jax.convert.mapping import ConversionError, is_cosmos_key

PICKLE_SUFFIXES = ('.pt', '.pth', '.bin')
SAFETENSORS_SUFFIX = '.safetensors'
TORCH_SUFFIXES = PICKLE_SUFFIXES + (SAFETENSORS_SUFFIX,)
LAYOUTS = ('open_clip', 'cosmos')


def is_torch_file(path: str) -> bool:
  return path.lower().endswith(TORCH_SUFFIXES)


def _is_tensor(x: Any) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def load_state_file(path: str) -> dict[str, Any]:
  """The object stored in a PyTorch file: a dict, for a checkpoint; tensors stay torch tensors."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  if path.lower().endswith(SAFETENSORS_SUFFIX):
    return _load_safetensors(path)
  if not path.lower().endswith(PICKLE_SUFFIXES):
    raise ConversionError(f'{path}: unknown checkpoint type (expected one of {TORCH_SUFFIXES})')
  import pickle
  torch = _torch(path, 'read')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    if 'weights only load failed' not in str(e).lower():
      raise ConversionError(f'{path}: not a readable PyTorch file ({e})') from None
    found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(e))
    what = f' (it needs {found.group(1)})' if found else ''
    raise ConversionError(
        f'{path}: untrusted pickle that needs code to load{what}; cosmos_jax reads only '
        'tensors, numbers, strings and dicts and will not run code from a checkpoint. '
        'Re-save it as a plain state dict or as .safetensors where you trust it.') from None
  except Exception as e:  # zip/pickle internals raise RuntimeError, KeyError, EOFError, ...
    raise ConversionError(f'{path}: not a readable PyTorch file (truncated, corrupt or not a '
                          f'torch checkpoint): {type(e).__name__}: {e}') from None
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path}: holds a {type(obj).__name__}, not a state dict or a '
                          'checkpoint dict')
  return dict(obj)


def _load_safetensors(path: str) -> dict[str, Any]:
  try:
    try:
      from safetensors.torch import load_file
    except ImportError:  # torch is optional for safetensors (no bfloat16 then)
      from safetensors.numpy import load_file
    return load_file(path)
  except Exception as e:
    raise ConversionError(f'{path}: not a readable safetensors file (truncated or corrupt?): '
                          f'{e}') from None


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """Drops `prefix` when every key carries it (a DDP-wrapped model's state dict)."""
  if sd and all(k.startswith(prefix) for k in sd):
    return {k[len(prefix):]: v for k, v in sd.items()}
  return dict(sd)


def _state_dict(obj: Any, what: str) -> dict[str, Any]:
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(f'{what} is not a state dict (got {type(obj).__name__}, '
                          'empty or not a dict)')
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not _is_tensor(v)]
  if bad:
    raise ConversionError(f'{what} is not a state dict: {len(bad)} of {len(obj)} entries are not '
                          f'named tensors, e.g. {bad[:5]}')
  return _strip(obj, 'module.')


def split_checkpoint(obj: Any, source: str = 'checkpoint') -> dict[str, dict[str, Any]]:
  """The state dicts in a loaded checkpoint, keyed 'student'/'teacher' (COSMOS) or 'params'.

  Recognises the official COSMOS training checkpoint (`student` keys with `module.`), the
  flat `student.`/`teacher.` safetensors layout written here, an open_clip training
  checkpoint (`state_dict`, maybe `module.`-prefixed) and a plain state dict.
  """
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{source}: holds a {type(obj).__name__}, not a checkpoint dict')
  if 'student' in obj or 'teacher' in obj:
    return {k: _state_dict(obj[k], f'{source}[{k!r}]') for k in ('student', 'teacher') if k in obj}
  keys = [k for k in obj if isinstance(k, str)]
  if keys and len(keys) == len(obj) and all(k.startswith(('student.', 'teacher.')) for k in keys):
    out = {}
    for role in ('student', 'teacher'):
      sub = {k[len(role) + 1:]: v for k, v in obj.items() if k.startswith(role + '.')}
      if sub:
        out[role] = _state_dict(sub, f'{source} ({role}.*)')
    return out
  if isinstance(obj.get('state_dict'), Mapping):
    return {'params': _state_dict(obj['state_dict'], f"{source}['state_dict']")}
  if not any(_is_tensor(v) for v in obj.values()):
    raise ConversionError(f'{source}: a dict without tensors (keys {sorted(map(str, obj))[:8]}), '
                          'not a state dict or COSMOS/open_clip checkpoint')
  return {'params': _state_dict(obj, source)}


def _torch(path: str, doing: str):
  """torch, or a ConversionError that says how to get it (it is an optional extra)."""
  try:
    import torch
  except ImportError:
    raise ConversionError(
        f'{path}: PyTorch is needed to {doing} a {os.path.splitext(path)[1]} file and is not '
        "installed: pip install 'cosmos_jax[torch]'"
        + (' (or read a .safetensors file, which needs no torch)' if doing == 'read' else '')
    ) from None
  return torch


def _to_torch(x: Any) -> Any:
  import torch
  x = np.asarray(x)
  if x.dtype.name == 'bfloat16':  # ml_dtypes; torch.from_numpy does not know it
    return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
  # A copy, so that no two tensors share memory (safetensors refuses that).
  return torch.from_numpy(np.array(x, copy=True))


def _open_clip_subset(sd: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in sd.items() if not is_cosmos_key(k)}


def save_state_file(path: str, state_dicts: Mapping[str, Mapping[str, Any]], layout: str,
                    epoch: int = 0, name: str = 'cosmos_jax') -> None:
  """Writes state dicts (numpy or torch values) as a `.pt`/`.pth`/`.bin` or `.safetensors`.

  `layout='cosmos'` takes 'student' and 'teacher' (one alone fills both);
  `layout='open_clip'` takes exactly one state dict and drops the COSMOS-only keys.
  """
  path = os.fspath(path)
  if not is_torch_file(path):
    raise ConversionError(f'{path}: unknown checkpoint type (expected one of {TORCH_SUFFIXES})')
  if layout not in LAYOUTS:
    raise ConversionError(f'unknown layout {layout!r}; expected one of {LAYOUTS}')
  torch = _torch(path, 'write')   # safetensors too: its writer takes torch tensors
  if layout == 'open_clip':
    if len(state_dicts) != 1:
      raise ConversionError(f"layout 'open_clip' writes one state dict, got {sorted(state_dicts)}")
    sd = {k: _to_torch(v) for k, v in _open_clip_subset(next(iter(state_dicts.values()))).items()}
  else:
    unknown = set(state_dicts) - {'student', 'teacher'}
    if unknown or not state_dicts:
      raise ConversionError(f"layout 'cosmos' takes 'student' and/or 'teacher', "
                            f'got {sorted(state_dicts)}')
    student = state_dicts.get('student', state_dicts.get('teacher'))
    teacher = state_dicts.get('teacher', student)
    student = {k: _to_torch(v) for k, v in student.items()}
    teacher = {k: _to_torch(v) for k, v in teacher.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  if path.lower().endswith(SAFETENSORS_SUFFIX):
    from safetensors.torch import save_file
    meta = {'format': 'pt', 'layout': layout}
    if layout == 'cosmos':
      sd = {**{f'student.{k}': v for k, v in student.items()},
            **{f'teacher.{k}': v for k, v in teacher.items()}}
      meta.update(epoch=str(epoch), name=name)
    save_file(sd, tmp, metadata=meta)
  else:
    if layout == 'cosmos':
      obj = {'epoch': epoch, 'name': name,
             'student': {f'module.{k}': v for k, v in student.items()}, 'teacher': teacher}
    else:
      obj = sd
    torch.save(obj, tmp)
  os.replace(tmp, path)  # a failed write leaves no half file under the real name
