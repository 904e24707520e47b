"""AdamW with the reference's weight-decay mask and its per-step warmup + cosine schedule.

optax.adamw equals torch.optim.AdamW: decoupled decay lr * wd * p taken from the parameters
before the step, bias-corrected moments, eps added after the square root.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

# The reference excludes from decay every tensor with ndim < 2 or whose name contains one
# of these (cosmos src/main.py). Flax paths keep the same module names (`ln_1`, `bias`,
# `logit_scale`), so the rule reads the same on them.
_NO_DECAY = re.compile(r'bn|ln|bias|logit_scale')


def path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: bool(jnp.ndim(x) >= 2 and not _NO_DECAY.search(path_name(path))), params)


def warmup_cosine(base_lr: float, warmup_steps: int, total_steps: int) -> Callable[[Any], Any]:
  """lr * (step + 1) / warmup during warmup, then 0.5 (1 + cos(pi (step - warmup) / (T - warmup))) lr.

  ``step`` is the 0-based index of the update, as the reference's ``scheduler(step)`` before
  each forward pass.
  """
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base_lr * (step + 1) / max(warmup_steps, 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    cos = 0.5 * (1 + jnp.cos(math.pi * (step - warmup_steps) / decay_steps)) * base_lr
    return jnp.where(step < warmup_steps, warm, cos)
  return schedule


def make_optimizer(lr: float, b1: float, b2: float, eps: float, weight_decay: float,
                   warmup_steps: int, total_steps: int,
                   grad_clip_norm: Optional[float] = None) -> tuple[optax.GradientTransformation,
                                                                    Callable[[Any], Any]]:
  schedule = warmup_cosine(lr, warmup_steps, total_steps)
  tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx, schedule


def optimizer_from_config(optim: Any, total_steps: int):
  """From the config's ``optim`` section (a ConfigDict or anything with these attributes)."""
  return make_optimizer(optim.lr, optim.b1, optim.b2, optim.eps, optim.weight_decay,
                        optim.warmup_steps, total_steps, optim.get('grad_clip_norm'))
