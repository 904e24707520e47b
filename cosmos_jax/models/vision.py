"""The ViT image tower of open_clip, with COSMOS's ``attn_cross_pool`` living under ``visual``."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.models.cross import AttentionalCrossPooler
from cosmos_jax.models.layers import (BlockStack, LayerNorm, Transformer, constrain, logical,
                                      normal)
from cosmos_jax.models.posemb import resize_pos_embed
from cosmos_jax.models.variants import VisionConfig

Dtype = Any


class VisionTransformer(nn.Module):
  """Images (B, H, W, 3), CLIP-normalised, to (pooled (B, E), {'tokens': (B, gh*gw, width)}).

  Patch tokens are taken after ``ln_post`` and are not projected; other input sizes (the
  local crops) use positional embeddings resized exactly as the reference does.
  ``csa=True`` runs SCLIP's correlative self-attention in the last block (segmentation).
  The pieces (``embed``, ``transformer``, ``ln_post``, ``project``) are used apart by the
  training forwards, which compute the last block only where it is read (``models/cosmos.py``).
  """
  config: VisionConfig
  embed_dim: int
  with_cross_pool: bool = False
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = 'xla'
  scan_layers: bool = False
  stack: Optional[BlockStack] = None

  def setup(self):
    c = self.config
    width_init = normal(c.width ** -0.5)  # the reference: width**-0.5 * randn
    self.conv1 = nn.Conv(
        c.width, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
        padding='VALID', use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=logical(nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
                            (None, None, None, 'embed')))
    self.class_embedding = self.param('class_embedding', logical(width_init, ('embed',)),
                                      (c.width,), jnp.float32)
    self.positional_embedding = self.param(
        'positional_embedding', logical(width_init, ('pos', 'embed')),
        (c.grid_size ** 2 + 1, c.width), jnp.float32)
    self.ln_pre = LayerNorm()
    self.transformer = Transformer(c.layers, c.heads, c.mlp_ratio, dtype=self.dtype,
                                   remat=self.remat, attention=self.attention,
                                   scan_layers=self.scan_layers, stack=self.stack)
    self.ln_post = LayerNorm()
    self.proj = self.param('proj', logical(width_init, ('embed', 'proj')),
                           (c.width, self.embed_dim), jnp.float32)
    if self.with_cross_pool:
      self.attn_cross_pool = AttentionalCrossPooler(c.attn_pooler_heads, dtype=self.dtype,
                                                    attention=self.attention)

  def embed(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """Patch embedding, CLS token, positional embedding and ``ln_pre``: (B, 1 + gh*gw, width)."""
    x = self.conv1(images.astype(self.dtype))
    b, gh, gw, w = x.shape
    x = x.reshape(b, gh * gw, w)
    cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (b, 1, w))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + resize_pos_embed(self.positional_embedding, (gh, gw)).astype(x.dtype)
    return constrain(self.ln_pre(x), ('batch', 'length', 'embed')), (gh, gw)

  def project(self, cls_state: jax.Array) -> jax.Array:
    """The post-``ln_post`` CLS state (B, width) -> the embedding (B, E)."""
    return jnp.dot(cls_state, self.proj.astype(self.dtype))

  def __call__(self, images: jax.Array, *, csa: bool = False) -> tuple[jax.Array, dict]:
    x, grid = self.embed(images)
    x = self.ln_post(self.transformer(x, csa_last=csa))
    x = constrain(x, ('batch', 'length', 'embed'))
    return self.project(x[:, 0]), {'tokens': x[:, 1:], 'grid': grid}

  def cross_pool(self, context: jax.Array, query: jax.Array) -> jax.Array:
    """``visual.attn_cross_pool``: text queries over (mapped) image patch tokens."""
    return self.attn_cross_pool(context, query)
