"""The COSMOS two-tower model: open_clip's CLIP plus cross poolers and token mappings.

Batches are sample-major, as the data pipeline yields them: images (B, V, H, W, 3), texts
(B, V, C). Outputs are view-major stacks (V, B, E), the order of the reference's
concatenated lists ([global1, global2, local1, ...] and [caption1, caption2, ...]).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.models.cross import AttentionalCrossPooler
from cosmos_jax.models.layers import (BlockStack, Linear, Transformer, constrain, l2_normalize,
                                      logical)
from cosmos_jax.models.text import TextTransformer
from cosmos_jax.models.variants import ModelConfig
from cosmos_jax.models.vision import VisionTransformer

Dtype = Any


def _flatten_views(x: jax.Array) -> jax.Array:
  """(B, V, ...) -> (B*V, ...), row i*V + v being view v of sample i.

  Sample-major, so a batch sharded over its samples stays sharded through the towers; a
  view-major merge would leave the sharded axis minor and make XLA gather the whole batch.
  """
  x = x.reshape((-1,) + x.shape[2:])
  return constrain(x, ('batch',) + (None,) * (x.ndim - 1))


def _views_by_sample(y: jax.Array, b: int) -> jax.Array:
  """(B*V, ...) from the towers -> (V, B, ...), the layout of the losses."""
  y = jnp.swapaxes(y.reshape((b, -1) + y.shape[1:]), 0, 1)
  return constrain(y, (None, 'batch') + (None,) * (y.ndim - 2))


def _normalized_views(y: jax.Array, b: int) -> jax.Array:
  return _views_by_sample(l2_normalize(y.astype(jnp.float32)), b)


def _last_block_where_read(transformer: Transformer, x: jax.Array, pool_index: jax.Array,
                           full_stride: int) -> tuple[jax.Array, jax.Array]:
  """Runs a tower's blocks over embedded rows x (N, L, D), sample-major with ``full_stride``
  views a sample, computing the last block only where its output is read.

  Rows 0, s, 2s, ... (view 0 of each sample, whose tokens the cross poolers read) are
  computed at every position; the others only at ``pool_index`` (N,) (the CLS or EOT
  position); s = 0: no row needs every position. Returns (the N/s full rows (none for s = 0)
  (N/s, L, D), the (N, D) states at ``pool_index``), both before the final LayerNorm.
  """
  x = transformer.body(x)
  if not full_stride:
    return x[:0], transformer.last(x, query_index=pool_index)[:, 0]
  grouped = lambda t: t.reshape((-1, full_stride) + t.shape[1:])
  full = transformer.last(grouped(x)[:, 0])
  pooled = jnp.take_along_axis(full, grouped(pool_index)[:, 0, None, None], axis=1)
  if full_stride > 1:
    rest = grouped(x)[:, 1:].reshape((-1,) + x.shape[1:])
    rest_index = grouped(pool_index)[:, 1:].reshape(-1)
    rest = transformer.last(rest, query_index=rest_index)
    pooled = jnp.concatenate([pooled, rest.reshape((-1, full_stride - 1, x.shape[-1]))], axis=1)
  return full, pooled.reshape((-1, x.shape[-1]))


class CLIP(nn.Module):
  """``config.cosmos`` adds ``distill_logit_scale``, both cross poolers and both token mappings.

  ``attention``: the attention kernel (``attention.py``); ``scan_layers``: each tower's body
  as one ``nn.scan``; ``stack``: the form of the towers' bodies otherwise (``BlockStack``).
  None of them changes a value or a parameter name (``scan_layers`` stacks the body's
  parameters; ``models/stacking.py`` converts).
  """
  config: ModelConfig
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = 'xla'
  scan_layers: bool = False
  stack: Optional[BlockStack] = None

  def setup(self):
    c = self.config
    tower = dict(dtype=self.dtype, remat=self.remat, attention=self.attention,
                 scan_layers=self.scan_layers, stack=self.stack)
    self.visual = VisionTransformer(c.vision, c.embed_dim, with_cross_pool=c.cosmos, **tower)
    self.text = TextTransformer(c.text, c.embed_dim, **tower)
    scale_init = logical(nn.initializers.constant(c.init_logit_scale), ())
    self.logit_scale = self.param('logit_scale', scale_init, (), jnp.float32)
    if c.cosmos:
      self.distill_logit_scale = self.param('distill_logit_scale', scale_init, (), jnp.float32)
      self.text_attn_cross_pool = AttentionalCrossPooler(c.text.attn_pooler_heads, self.dtype,
                                                         self.attention)
      self.image_token_mapping = Linear(c.embed_dim, ('embed', 'proj'), dtype=self.dtype)
      self.text_token_mapping = Linear(c.embed_dim, ('embed', 'proj'), dtype=self.dtype)

  # --- uni-modal encoders (inference, evaluation) ---

  def encode_image(self, images: jax.Array, *, normalize: bool = True,
                   csa: bool = False) -> tuple[jax.Array, dict]:
    """(B, H, W, 3) -> features (B, E) float32, {'tokens': post-ln_post patch tokens}."""
    pooled, aux = self.visual(images, csa=csa)
    pooled = pooled.astype(jnp.float32)
    return (l2_normalize(pooled) if normalize else pooled), aux

  def encode_text(self, text: jax.Array, *, normalize: bool = True) -> tuple[jax.Array, dict]:
    """(B, C) token ids -> features (B, E) float32, {'tokens': all C post-ln_final states}."""
    pooled, aux = self.text(text)
    pooled = pooled.astype(jnp.float32)
    return (l2_normalize(pooled) if normalize else pooled), aux

  def __call__(self, images: jax.Array, text: jax.Array) -> dict[str, jax.Array]:
    """Plain CLIP inference: normalised embeddings and exp(logit_scale)."""
    image_features, _ = self.encode_image(images)
    text_features, _ = self.encode_text(text)
    return {'image_features': image_features, 'text_features': text_features,
            'logit_scale': jnp.exp(self.logit_scale)}

  # --- the training forwards: every view pooled, the tokens of view 0 only ---

  def image_views(self, images: jax.Array, full_stride: int) -> tuple[jax.Array, jax.Array]:
    """Images (N, H, W, 3), ``full_stride`` views a sample -> (raw embeddings (N, E),
    post-ln_post patch tokens of views 0, s, 2s, ... (N/s, gh*gw, width))."""
    v = self.visual
    x, _ = v.embed(images)
    full, pooled = _last_block_where_read(v.transformer, x, jnp.zeros((x.shape[0],), jnp.int32),
                                          full_stride)
    return v.project(v.ln_post(pooled)), v.ln_post(full)[:, 1:]

  def text_views(self, text: jax.Array, full_stride: int) -> tuple[jax.Array, jax.Array]:
    """Token ids (N, C), ``full_stride`` views a sample -> (raw embeddings (N, E),
    post-ln_final states of rows 0, s, 2s, ... (N/s, C, width))."""
    t = self.text
    full, pooled = _last_block_where_read(t.transformer, t.embed(text), t.eot_index(text),
                                          full_stride)
    return t.project(t.ln_final(pooled)), t.ln_final(full)

  def student(self, global_crops: jax.Array, local_crops: Optional[jax.Array],
              texts: jax.Array) -> dict[str, jax.Array]:
    """The student over a multi-crop batch.

    global_crops (B, Vg, H, W, 3) and local_crops (B, Vl, h, w, 3) run as two backbone
    calls; texts (B, Vt, C) run as one. Each image view of sample i attends over the mapped
    tokens of caption 1 of sample i; each caption attends over the mapped patch tokens of
    global crop 1 of sample i. The query is the raw embedding and the residual is added to it
    before L2 normalisation. Returns normalised (V, B, E) stacks and the log-space scales.
    """
    b, n_global = global_crops.shape[:2]
    if not self.config.cosmos:
      # The CLIP-only baseline: L_CLIP reads the global crops only, so the local crops
      # (which feed the cross poolers alone) are not encoded.
      image_features, _ = self.image_views(_flatten_views(global_crops), 0)
      text_features, _ = self.text_views(_flatten_views(texts), 0)
      return {'image_features': _normalized_views(image_features, b),
              'text_features': _normalized_views(text_features, b),
              'logit_scale': self.logit_scale}
    # Only global crop 1's and caption 1's tokens are read: the last blocks compute every
    # position of view 0 of each sample only.
    pooled, crop1_tokens = self.image_views(_flatten_views(global_crops), n_global)
    image_features = [_views_by_sample(pooled, b)]
    if local_crops is not None and local_crops.shape[1]:
      local_pooled, _ = self.image_views(_flatten_views(local_crops), 0)
      image_features.append(_views_by_sample(local_pooled, b))
    z_img = jnp.concatenate(image_features).astype(jnp.float32)        # (Vi, B, E)

    pooled, caption1_tokens = self.text_views(_flatten_views(texts), texts.shape[1])
    z_txt = _views_by_sample(pooled, b).astype(jnp.float32)            # (Vt, B, E)

    image_ctx = self.image_token_mapping(crop1_tokens)                  # (B, N, E)
    text_ctx = self.text_token_mapping(caption1_tokens)                 # (B, C, E)
    # All views of a sample share one context, so they attend as Vi (or Vt) queries at once;
    # this equals the reference's tiled context (queries do not interact).
    img_pooled = self.text_attn_cross_pool(text_ctx, jnp.swapaxes(z_img, 0, 1))
    txt_pooled = self.visual.cross_pool(image_ctx, jnp.swapaxes(z_txt, 0, 1))
    image_cross = z_img + jnp.swapaxes(img_pooled, 0, 1).astype(jnp.float32)
    text_cross = z_txt + jnp.swapaxes(txt_pooled, 0, 1).astype(jnp.float32)
    return {
        'image_features': l2_normalize(z_img),
        'text_features': l2_normalize(z_txt),
        'image_cross': l2_normalize(image_cross),
        'text_cross': l2_normalize(text_cross),
        'logit_scale': self.logit_scale,
        'distill_logit_scale': self.distill_logit_scale,
    }

  def teacher(self, global_crops: jax.Array, texts: jax.Array) -> dict[str, jax.Array]:
    """The teacher: uni-modal normalised embeddings of the global crops and global captions.

    global_crops (B, Vg, H, W, 3); texts (B, Vt, C) of which the first Vg are the global
    captions. No cross-attention modules are used.
    """
    b, n_global = global_crops.shape[:2]
    image_features, _ = self.image_views(_flatten_views(global_crops), 0)
    text_features, _ = self.text_views(_flatten_views(texts[:, :n_global]), 0)
    return {'image_features': _normalized_views(image_features, b),
            'text_features': _normalized_views(text_features, b)}

  def init_all(self, images: jax.Array, texts: jax.Array) -> Any:
    """Touches every parameter (used by ``init``): images (B, V, H, W, 3), texts (B, V, C)."""
    if self.config.cosmos:
      return self.student(images, None, texts)
    return self(images[:, 0], texts[:, 0])
