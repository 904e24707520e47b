"""The causal text tower of open_clip (flattened onto the CLIP root in PyTorch, ``text/`` here)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.models.layers import BlockInit, LayerNorm, Transformer, constrain, logical, normal
from cosmos_jax.models.variants import TextConfig

Dtype = Any


class TextTransformer(nn.Module):
  """Token ids (B, C) to (pooled (B, E), {'tokens': (B, C, width)}).

  Causal mask only, no padding mask: positions after EOT get ordinary states, and COSMOS's
  image-to-text cross-attention attends to them. ``ln_final`` runs on all positions; the
  pooled feature is the state at the EOT token (the largest id) times ``text_projection``.
  ``token_stride=s`` returns tokens of rows 0, s, 2s, ... only (none for 0) and skips the
  positions nothing reads in the last block (``Transformer``); the pooled features are the same.
  ``differentiated``: the forward is differentiated (the student's); see ``Transformer``.
  """
  config: TextConfig
  embed_dim: int
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, text: jax.Array, *,
               token_stride: Optional[int] = None,
               differentiated: bool = False) -> tuple[jax.Array, dict]:
    c = self.config
    if text.shape[-1] != c.context_length:
      raise ValueError(f'text has {text.shape[-1]} positions, the model expects {c.context_length}')
    embed = nn.Embed(c.vocab_size, c.width, dtype=self.dtype, param_dtype=jnp.float32,
                     embedding_init=logical(normal(0.02), ('vocab', 'embed')),
                     name='token_embedding')
    pos = self.param('positional_embedding', logical(normal(0.01), ('pos', 'embed')),
                     (c.context_length, c.width), jnp.float32)
    x = embed(text) + pos.astype(self.dtype)
    transformer = Transformer(c.layers, c.heads, c.mlp_ratio,
                              BlockInit.text_tower(c.width, c.layers), self.dtype, self.remat,
                              name='transformer')
    ln_final = LayerNorm(name='ln_final')
    eot = jnp.argmax(text, axis=-1)
    if token_stride is None:
      x = ln_final(transformer(x, causal=True, differentiated=differentiated))
      pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    else:
      x, pooled = transformer(x, causal=True, pool_index=eot, token_stride=token_stride,
                              differentiated=differentiated)
      x, pooled = ln_final(x), ln_final(pooled)
    x = constrain(x, ('batch', 'length', 'embed'))
    proj = self.param('text_projection', logical(normal(c.width ** -0.5), ('embed', 'proj')),
                      (c.width, self.embed_dim), jnp.float32)
    return jnp.dot(pooled, proj.astype(self.dtype)), {'tokens': x}
