"""The towers' bodies on XLA:CPU: the residual stream's cotangent stored between blocks.

Left alone, the backward's residual-stream cotangent (a running sum over every later block's
LayerNorm and input-projection gradients) is fused, not stored, into each block's consumers:
work quadratic in depth (ViT-B/16: ~25% of the step). This form stores that cotangent
between blocks; with ``remat`` it runs the blocks as a ``lax.scan`` instead, the one form in
which XLA:CPU keeps remat's recomputation (unrolled, it merges it with the forward again and
nothing is saved). Only for one CPU device: on several host devices the scan's collectives
starve the thread pool the devices share (deadlock), and the stored cotangent's trip count
(its first element) would take a collective of its own.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.models.layers import BlockStack


def one_trip_copy(x: jax.Array) -> jax.Array:
  """x, passed through a while loop of one trip that XLA cannot count at compile time.

  A loop's operands and results are whole buffers, so nothing is fused across it: the fusion
  barrier XLA:CPU honours (it expands ``optimization_barrier`` before fusing). The trip count
  is 2 when x's first element is NaN, with the same result.
  """
  if not x.size:
    return x
  trips = 1 + jnp.isnan(x.reshape(-1)[0]).astype(jnp.int32)

  def body(carry):
    i, y = carry
    # A float product by a loop-dependent 1: XLA cannot fold it, so y is not loop-invariant
    # (an invariant carry would be forwarded past the loop, barrier and all).
    return i + 1, y * (1 + 0 * i.astype(y.dtype))

  return jax.lax.while_loop(lambda carry: carry[0] < trips, body, (jnp.int32(0), x))[1]


@jax.custom_vjp
def store_cotangent(x: jax.Array) -> jax.Array:
  """Identity whose backward stores the cotangent whole (``one_trip_copy``)."""
  return x


store_cotangent.defvjp(lambda x: (x, None), lambda _, g: (one_trip_copy(g),))


class CpuBlockStack(BlockStack):
  """``BlockStack`` for a single XLA:CPU device (see the module's docstring)."""

  def __call__(self, blocks: Sequence[nn.Module], x: jax.Array, *, remat: bool,
               template: nn.Module) -> jax.Array:
    if remat and len(blocks) > 1:
      stacked = jax.tree.map(lambda *p: jnp.stack(p), *[b.variables['params'] for b in blocks])

      def body(x, params):
        return template.apply({'params': params}, x), None

      return jax.lax.scan(jax.checkpoint(body), x, stacked)[0]
    for block in blocks:
      x = block(store_cotangent(x))
    return store_cotangent(x)
