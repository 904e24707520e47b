"""COSMOS's ``AttentionalCrossPooler``: LN on the queries, LN on the context, multi-head attention.

No residual, MLP or output LN inside: the caller adds the residual to the raw query.
There is no key mask: text contexts include SOT, EOT and every pad position.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.models.layers import LayerNorm, MultiheadAttention


class AttentionalCrossPooler(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32
  attention: str = 'xla'

  @nn.compact
  def __call__(self, context: jax.Array, query: jax.Array) -> jax.Array:
    """context (B, L, D) keys/values; query (B, Q, D), each query attending on its own."""
    q = LayerNorm(name='ln_q')(query)
    k = LayerNorm(name='ln_k')(context)
    return MultiheadAttention(self.num_heads, dtype=self.dtype, attention=self.attention,
                              name='attn')(q, k)
