"""The EMA teacher: theta_t <- m theta_t + (1 - m) theta_s over every parameter."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def momentum_at(step, base: float, schedule: str = 'fixed', total_steps: int = 1,
                final: float = 1.0):
  """Fixed momentum (the released recipes) or DINO's cosine from ``base`` to ``final``."""
  if schedule == 'fixed':
    return jnp.asarray(base, jnp.float32)
  if schedule == 'cosine':
    t = jnp.asarray(step, jnp.float32) / max(total_steps, 1)
    return final - (final - base) * (jnp.cos(math.pi * t) + 1) / 2
  raise ValueError(f"ema schedule must be 'fixed' or 'cosine', got {schedule!r}")


def ema_update(teacher: Any, student: Any, momentum) -> Any:
  """Every leaf, logit scales and COSMOS modules included (the reference zips all parameters)."""
  return jax.tree.map(lambda t, s: momentum * t + (1 - momentum) * s, teacher, student)
