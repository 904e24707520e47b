"""The causal text tower of open_clip (flattened onto the CLIP root in PyTorch, ``text/`` here)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.models.layers import (BlockInit, BlockStack, LayerNorm, Transformer, constrain,
                                      logical, normal)
from cosmos_jax.models.variants import TextConfig

Dtype = Any


class TextTransformer(nn.Module):
  """Token ids (B, C) to (pooled (B, E), {'tokens': (B, C, width)}).

  Causal mask only, no padding mask: positions after EOT get ordinary states, and COSMOS's
  image-to-text cross-attention attends to them. ``ln_final`` runs on all positions; the
  pooled feature is the state at the EOT token (the largest id) times ``text_projection``.
  The pieces (``embed``, ``transformer``, ``ln_final``, ``project``) are used apart by the
  training forwards, which compute the last block only where it is read (``models/cosmos.py``).
  """
  config: TextConfig
  embed_dim: int
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = 'xla'
  scan_layers: bool = False
  stack: Optional[BlockStack] = None

  def setup(self):
    c = self.config
    self.token_embedding = nn.Embed(c.vocab_size, c.width, dtype=self.dtype,
                                    param_dtype=jnp.float32,
                                    embedding_init=logical(normal(0.02), ('vocab', 'embed')))
    self.positional_embedding = self.param(
        'positional_embedding', logical(normal(0.01), ('pos', 'embed')),
        (c.context_length, c.width), jnp.float32)
    self.transformer = Transformer(c.layers, c.heads, c.mlp_ratio,
                                   BlockInit.text_tower(c.width, c.layers), self.dtype,
                                   self.remat, causal=True, attention=self.attention,
                                   scan_layers=self.scan_layers, stack=self.stack)
    self.ln_final = LayerNorm()
    self.text_projection = self.param(
        'text_projection', logical(normal(c.width ** -0.5), ('embed', 'proj')),
        (c.width, self.embed_dim), jnp.float32)

  def embed(self, text: jax.Array) -> jax.Array:
    """Token and positional embeddings: (B, C, width)."""
    c = self.config
    if text.shape[-1] != c.context_length:
      raise ValueError(f'text has {text.shape[-1]} positions, the model expects {c.context_length}')
    x = self.token_embedding(text) + self.positional_embedding.astype(self.dtype)
    return constrain(x, ('batch', 'length', 'embed'))

  @staticmethod
  def eot_index(text: jax.Array) -> jax.Array:
    """The position of each row's EOT token, the largest id: (B,)."""
    return jnp.argmax(text, axis=-1)

  def project(self, eot_state: jax.Array) -> jax.Array:
    """The post-``ln_final`` EOT state (B, width) -> the embedding (B, E)."""
    return jnp.dot(eot_state, self.text_projection.astype(self.dtype))

  def __call__(self, text: jax.Array) -> tuple[jax.Array, dict]:
    x = self.ln_final(self.transformer(self.embed(text)))
    x = constrain(x, ('batch', 'length', 'embed'))
    pooled = jnp.take_along_axis(x, self.eot_index(text)[:, None, None], axis=1)[:, 0]
    return self.project(pooled), {'tokens': x}
