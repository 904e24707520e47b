"""In-place update of the donated teacher and student on XLA:CPU.

XLA:CPU writes a donated leaf in place only when all its readers come first in the data flow;
otherwise it copies the leaf at the start of the step (ViT-B/16: 600 MB per tree). Each update
here takes a zero computed from the old value's other readers: the teacher's EMA momentum from
the loss (after the teacher forward), the student's update from the backward (via the
gradient norm) and from the EMA (via one element of each new teacher leaf). The last reads
one element of each teacher leaf, a collective where the leaf is sharded, hence one CPU
device only. XLA:TPU needs none of this (``train.step.UpdateOrdering``).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from cosmos_jax.train.step import UpdateOrdering


def zero_after(*scalars: jax.Array) -> jax.Array:
  """A zero computed from ``scalars``: adding it orders an op after them (XLA cannot fold it
  away; NaN only where a scalar is NaN, never for an infinite one)."""
  return jnp.minimum(sum(jnp.abs(x) for x in scalars), 0)


class InPlaceOrdering(UpdateOrdering):
  """The teacher after the loss; the student after the backward and the EMA."""

  def teacher_momentum(self, momentum: jax.Array, loss: jax.Array) -> jax.Array:
    return momentum + zero_after(loss)

  def student_params(self, new_params: Any, grad_norm: jax.Array,
                     new_teacher: Optional[Any]) -> Any:
    if new_teacher is None:
      return jax.tree.map(lambda p: p + zero_after(grad_norm), new_params)
    first = lambda t: t.reshape(-1)[0] if t.size else jnp.zeros((), t.dtype)
    return jax.tree.map(lambda p, t: p + zero_after(grad_norm, first(t)), new_params, new_teacher)
