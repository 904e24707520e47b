"""Weight conversion between PyTorch (official COSMOS, open_clip) and cosmos_jax.

The format of each side is told by its form: a `.pt`/`.pth`/`.bin`/`.safetensors` file is
PyTorch, a directory is a cosmos_jax params dir (orbax + `model_config.json`).

Trees are named by role: an official COSMOS checkpoint gives 'student' and 'teacher', a
plain open_clip state dict gives 'params'; a params dir keeps the names it was written with.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cosmos_jax.convert.mapping import (ConversionError, check_params, flax_shapes,
                                        flax_to_torch, has_cosmos_keys, infer_config,
                                        torch_shapes, torch_to_flax)
from cosmos_jax.convert.params_io import load_params_dir, save_params_dir
from cosmos_jax.convert.torch_io import (is_torch_file, load_state_file, save_state_file,
                                         split_checkpoint)
from cosmos_jax.models.variants import ModelConfig, get_variant

__all__ = ['ConversionError', 'convert', 'load_params', 'pick_tree', 'flax_to_torch', 'torch_to_flax',
           'infer_config', 'flax_shapes', 'torch_shapes', 'check_params', 'load_state_file',
           'save_state_file', 'split_checkpoint', 'load_params_dir', 'save_params_dir']

WHICH = ('both', 'student', 'teacher')
# Tree names that play each role (params dirs written by a trainer may use the latter).
_ROLE_NAMES = {'student': ('student', 'params'), 'teacher': ('teacher', 'teacher_params')}


def _variant(variant: str, cosmos: bool) -> ModelConfig:
  try:
    return get_variant(variant, cosmos=cosmos)
  except (ValueError, FileNotFoundError) as e:
    raise ConversionError(str(e)) from None


def _read(src: str, variant: str | None) -> tuple[dict[str, Any], ModelConfig, dict]:
  if os.path.isdir(src):
    trees, config = load_params_dir(src)
    if variant:
      config = _variant(variant, config.cosmos)
      for name, tree in trees.items():
        try:
          check_params(tree, config)
        except ConversionError as e:
          raise ConversionError(f'{src} [{name}]: {e}') from None
    return trees, config, {}
  if not is_torch_file(src):
    raise ConversionError(f'{src}: neither a params directory nor a '
                          '.pt/.pth/.bin/.safetensors file')
  obj = load_state_file(src)
  state_dicts = split_checkpoint(obj, source=src)
  first = next(iter(state_dicts.values()))
  config = _variant(variant, has_cosmos_keys(first)) if variant else infer_config(first)
  try:
    trees = {k: torch_to_flax(sd, config) for k, sd in state_dicts.items()}
  except ConversionError as e:
    raise ConversionError(f'{src}: {e}') from None
  meta = {k: obj[k] for k in ('epoch', 'name') if isinstance(obj.get(k), (int, str))}
  return trees, config, meta


def load_params(src: str, *, variant: str | None = None) -> tuple[dict[str, Any], ModelConfig]:
  """Flax trees (numpy leaves) and config from a PyTorch file or a params dir.

  `variant` (a name or an open_clip JSON) overrides the config inferred from shapes or stored.
  """
  trees, config, _ = _read(os.fspath(src), variant)
  return trees, config


def _roles(trees: dict[str, Any]) -> dict[str, str]:
  """Role ('student'/'teacher') -> the name of the tree that plays it."""
  out = {}
  for role, names in _ROLE_NAMES.items():
    found = [n for n in names if n in trees]
    if found:
      out[role] = found[0]
  if not out:
    raise ConversionError(f'no student/teacher/params tree among {sorted(trees)}')
  return out


def _pick(roles: dict[str, str], which: str) -> tuple[str, str]:
  """(role, tree name): `which`, or the teacher for 'both'; a single-tree source gives that tree."""
  want = 'teacher' if which == 'both' else which
  if want in roles:
    return want, roles[want]
  if len(roles) == 1:
    role, name = next(iter(roles.items()))
    if which != 'both':
      logging.warning('no %s tree; using the only one, %r', want, name)
    return role, name
  raise ConversionError(f'no {want} tree in the source (trees: {sorted(roles.values())})')


def pick_tree(trees: dict[str, Any], which: str = 'teacher') -> Any:
  """The tree playing ``which`` ('teacher' or 'student'; 'both' means the teacher) among named
  trees (converted trees, a params dir, a train state); a single tree is returned whatever
  ``which`` asks for (a CLIP-only run has no teacher)."""
  return trees[_pick(_roles(trees), which)[1]]


def _check_destination(src: str, dst: str, overwrite: bool) -> None:
  """Nothing is replaced unasked, and a source is never written over itself."""
  if os.path.exists(src) and os.path.exists(dst):
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_src == real_dst or (os.path.isdir(dst) and real_src.startswith(real_dst + os.sep)):
      raise ConversionError(f'{dst} is (or holds) the source {src}; write the conversion to '
                            'another path')
  if os.path.isfile(dst) and not overwrite:
    raise ConversionError(f'{dst} exists; pass --overwrite to replace it (or choose another path)')
  if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
    raise ConversionError(f'{dst}: the directory exists and is not empty; pass --overwrite to '
                          'replace a params directory there (or choose another path)')


def convert(src: str, dst: str, *, variant: str | None = None, which: str = 'both',
            layout: str | None = None, overwrite: bool = False) -> str:
  """Converts weights from `src` to `dst`; returns a one-line summary.

  overwrite: replace an existing destination file or params directory (never `src` itself).

  which: 'both' keeps every tree of the source; 'student'/'teacher' keeps one (a source
    with a single tree gives that tree either way). Writing one tree (open_clip layout)
    with 'both' takes the teacher, the weights COSMOS evaluates and segments with.
  layout: for a PyTorch destination, 'cosmos' (official dict; both trees, the teacher
    copied from the student when there is only one) or 'open_clip' (the 302 standard keys
    of one tree). Default: 'cosmos' for COSMOS models, else 'open_clip'.
  """
  src, dst = os.fspath(src), os.fspath(dst)
  if which not in WHICH:
    raise ConversionError(f'which must be one of {WHICH}, got {which!r}')
  to_torch = is_torch_file(dst)
  if not to_torch and os.path.splitext(dst)[1] and not os.path.isdir(dst):
    raise ConversionError(f'{dst}: unknown destination type (a .pt/.pth/.bin/.safetensors file '
                          'or a directory)')
  if layout is not None and layout not in ('open_clip', 'cosmos'):
    raise ConversionError(f"layout must be 'open_clip' or 'cosmos', got {layout!r}")
  if layout is not None and not to_torch:
    raise ConversionError(f'layout applies to PyTorch destinations only, not the directory {dst}')
  _check_destination(src, dst, overwrite)
  trees, config, meta = _read(src, variant)
  kind = 'COSMOS' if config.cosmos else 'CLIP'

  if not to_torch:
    if which != 'both':
      _, name = _pick(_roles(trees), which)
      trees = {name: trees[name]}
    save_params_dir(dst, trees, config, overwrite=overwrite)
    what = f'trees {", ".join(trees)}'
  else:
    layout = layout or ('cosmos' if config.cosmos else 'open_clip')
    roles = _roles(trees)
    if layout == 'cosmos':
      if not config.cosmos:
        raise ConversionError(f"layout 'cosmos' needs a COSMOS model; {config.name!r} is a plain "
                              "CLIP (no cross poolers or token mappings): use layout='open_clip'")
      if which != 'both':
        roles = dict([_pick(roles, which)])
      out = {role: flax_to_torch(trees[name], config) for role, name in roles.items()}
      teacher_note = '' if 'teacher' in out else ' (teacher := student)'
      what = f'{", ".join(out)}{teacher_note}'
    else:
      _, name = _pick(roles, which)
      out = {name: flax_to_torch(trees[name], config)}
      what = f'the {name} tree'
    save_state_file(dst, out, layout, epoch=meta.get('epoch', 0),
                    name=meta.get('name', 'cosmos_jax'))
    what += f', {layout} layout'
  return f'{src} -> {dst}: {config.name} ({kind}), {what}'
