"""In-place updates of the donated train state on XLA:CPU.

XLA writes a donated leaf in place only when all its readers come first in the data flow;
otherwise it copies the leaf at the start of the step (ViT-B/16: 600 MB per tree). Adding a
zero computed from those readers makes them inputs of the update: the teacher forward (via
the loss) for the EMA, and for the student the backward (via the gradient norm) and the EMA
(via one element of each new teacher leaf). The last reads one element of each teacher
leaf, a collective where the leaf is sharded, hence one CPU device only.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from cosmos_jax.train.step import UpdateOrdering


def after(*scalars: jax.Array) -> jax.Array:
  """A zero computed from ``scalars``, so that adding it orders an op after them (not folded
  away by XLA; NaN only where a scalar is NaN, never for an infinite one)."""
  return jnp.minimum(sum(jnp.abs(x) for x in scalars), 0)


class InPlaceOrdering(UpdateOrdering):

  def teacher_momentum(self, momentum: jax.Array, loss: jax.Array) -> jax.Array:
    return momentum + after(loss)

  def student_params(self, new_params: Any, grad_norm: jax.Array,
                     new_teacher: Optional[Any]) -> Any:
    if new_teacher is None:
      return jax.tree.map(lambda p: p + after(grad_norm), new_params)
    first = lambda t: t.reshape(-1)[0] if t.size else jnp.zeros((), t.dtype)
    return jax.tree.map(lambda p, t: p + after(grad_norm, first(t)), new_params, new_teacher)
