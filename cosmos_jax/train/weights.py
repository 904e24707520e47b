"""Loading one parameter tree for evaluation from any checkpoint form.

A training work directory (or its ``checkpoints/``) is read with its saved config, read-only
(a live run beside it is never disturbed); a PyTorch file or a cosmos_jax params directory
goes through ``cosmos_jax.convert``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import ml_collections

from cosmos_jax import convert, models
from cosmos_jax.train import checkpoint, optim, partition, state as state_lib

def _checkpoint_dir(path: str) -> Optional[str]:
  for candidate in (os.path.join(path, 'checkpoints'), path):
    if os.path.isdir(candidate) and any(n.isdigit() for n in os.listdir(candidate)):
      return candidate
  return None


def load_for_eval(path: str, *, which: str = 'teacher',
                  variant: Optional[str] = None) -> tuple[models.ModelConfig, Any]:
  """(model config, the ``which`` tree); a CLIP-only run has no teacher and gives its params."""
  if which not in ('teacher', 'student'):
    raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  ckpt_dir = _checkpoint_dir(path) if os.path.isdir(path) else None
  if ckpt_dir is None or convert.params_io.is_params_dir(path):
    trees, config = convert.load_params(path, variant=variant)
    return config, convert.pick_tree(trees, which)
  # Read-only: the run may be training right now; a reader that removed its temporary
  # directories (orbax's clean-up on open) would delete the save in progress.
  ckpt = checkpoint.Checkpointer(ckpt_dir, read_only=True)
  try:
    saved = ckpt.read_config()
    if saved is None:
      raise ValueError(f'{ckpt_dir}: the checkpoint has no saved config')
    model_cfg = models.get_variant(variant or saved['model']['variant'],
                                   cosmos=saved['model']['cosmos'])
    optim_cfg = ml_collections.ConfigDict(saved['optim'])
    tx, _ = optim.optimizer_from_config(optim_cfg, saved['total_steps'])
    mesh = partition.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    scanned = bool(saved['model'].get('scan_layers', False))   # the saved block layout
    shardings = state_lib.state_shardings(model_cfg, tx, mesh, partition.resolve_rules('dp'),
                                          with_teacher=model_cfg.cosmos, scan_layers=scanned)
    target = state_lib.abstract_state(shardings, model_cfg, tx, with_teacher=model_cfg.cosmos,
                                      scan_layers=scanned)
    restored = ckpt.restore_or_none(target)   # the newest finalised step that verifies
    if restored is None:
      raise FileNotFoundError(f'no finalised checkpoint in {ckpt_dir}')
    state = restored[0]
  finally:
    ckpt.close()
  # Evaluation and export read the unrolled layout (models/stacking.py).
  return model_cfg, models.unstack_layers(convert.pick_tree(state, which))
