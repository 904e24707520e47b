"""In-place update of the donated student on XLA:CPU.

XLA writes a donated leaf in place only when all its readers come first in the data flow;
otherwise it copies the leaf at the start of the step (ViT-B/16: 600 MB per tree). The
teacher is ordered on every backend (``train.step.UpdateOrdering``); here the student's
update also takes a zero computed from its readers: the backward (via the gradient norm) and
the EMA (via one element of each new teacher leaf). The last reads one element of each
teacher leaf, a collective where the leaf is sharded, hence one CPU device only.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from cosmos_jax.train.step import UpdateOrdering, zero_after


class InPlaceOrdering(UpdateOrdering):
  """The teacher as on every backend; the student after the backward and the EMA."""

  def student_params(self, new_params: Any, grad_norm: jax.Array,
                     new_teacher: Optional[Any]) -> Any:
    if new_teacher is None:
      return jax.tree.map(lambda p: p + zero_after(grad_norm), new_params)
    first = lambda t: t.reshape(-1)[0] if t.size else jnp.zeros((), t.dtype)
    return jax.tree.map(lambda p, t: p + zero_after(grad_norm, first(t)), new_params, new_teacher)
