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
from cosmos_jax.models.layers import Linear, l2_normalize, logical
from cosmos_jax.models.text import TextTransformer
from cosmos_jax.models.variants import ModelConfig
from cosmos_jax.models.vision import VisionTransformer

Dtype = Any


def _flatten_views(x: jax.Array) -> jax.Array:
  """(B, V, ...) -> (B*V, ...), row i*V + v being view v of sample i.

  Sample-major, so a batch sharded over its samples stays sharded through the towers; a
  view-major merge would leave the sharded axis minor and make XLA gather the whole batch.
  """
  return x.reshape((-1,) + x.shape[2:])


def _views_by_sample(y: jax.Array, b: int) -> jax.Array:
  """(B*V, ...) from the towers -> (V, B, ...), the layout of the losses."""
  return jnp.swapaxes(y.reshape((b, -1) + y.shape[1:]), 0, 1)


class CLIP(nn.Module):
  """``config.cosmos`` adds ``distill_logit_scale``, both cross poolers and both token mappings."""
  config: ModelConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    self.visual = VisionTransformer(c.vision, c.embed_dim, with_cross_pool=c.cosmos,
                                    dtype=self.dtype, remat=self.remat)
    self.text = TextTransformer(c.text, c.embed_dim, dtype=self.dtype, remat=self.remat)
    scale_init = logical(nn.initializers.constant(c.init_logit_scale), ())
    self.logit_scale = self.param('logit_scale', scale_init, (), jnp.float32)
    if c.cosmos:
      self.distill_logit_scale = self.param('distill_logit_scale', scale_init, (), jnp.float32)
      self.text_attn_cross_pool = AttentionalCrossPooler(c.text.attn_pooler_heads, self.dtype)
      self.image_token_mapping = Linear(c.embed_dim, ('embed', 'proj'), dtype=self.dtype)
      self.text_token_mapping = Linear(c.embed_dim, ('embed', 'proj'), dtype=self.dtype)

  # --- uni-modal encoders (inference, evaluation, the teacher) ---

  def encode_image(self, images: jax.Array, *, normalize: bool = True, csa: bool = False,
                   token_stride: Optional[int] = None,
                   differentiated: bool = False) -> tuple[jax.Array, dict]:
    """(B, H, W, 3) -> features (B, E) float32, {'tokens': post-ln_post patch tokens}.

    ``token_stride``: tokens of images 0, s, 2s, ... only (0: none); ``differentiated``: the
    forward is differentiated (the student's). See ``Transformer``.
    """
    pooled, aux = self.visual(images, csa=csa, token_stride=token_stride,
                              differentiated=differentiated)
    pooled = pooled.astype(jnp.float32)
    return (l2_normalize(pooled) if normalize else pooled), aux

  def encode_text(self, text: jax.Array, *, normalize: bool = True,
                  token_stride: Optional[int] = None,
                  differentiated: bool = False) -> tuple[jax.Array, dict]:
    """(B, C) token ids -> features (B, E) float32, {'tokens': all C post-ln_final states}.

    ``token_stride``: tokens of rows 0, s, 2s, ... only (0: none); ``differentiated``: the
    forward is differentiated (the student's). See ``Transformer``.
    """
    pooled, aux = self.text(text, token_stride=token_stride, differentiated=differentiated)
    pooled = pooled.astype(jnp.float32)
    return (l2_normalize(pooled) if normalize else pooled), aux

  def __call__(self, images: jax.Array, text: jax.Array) -> dict[str, jax.Array]:
    """Plain CLIP inference: normalised embeddings and exp(logit_scale)."""
    image_features, _ = self.encode_image(images)
    text_features, _ = self.encode_text(text)
    return {'image_features': image_features, 'text_features': text_features,
            'logit_scale': jnp.exp(self.logit_scale)}

  # --- COSMOS training forwards ---

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
      image_features, _ = self.encode_image(_flatten_views(global_crops), differentiated=True)
      text_features, _ = self.encode_text(_flatten_views(texts), differentiated=True)
      return {'image_features': _views_by_sample(image_features, b).astype(jnp.float32),
              'text_features': _views_by_sample(text_features, b).astype(jnp.float32),
              'logit_scale': self.logit_scale}
    # Only global crop 1's and caption 1's tokens are read: token_stride keeps every position
    # of view 0 of each sample, and the last blocks skip the positions nothing reads.
    pooled, aux = self.visual(_flatten_views(global_crops), token_stride=n_global,
                              differentiated=True)
    image_features = [_views_by_sample(pooled, b)]
    crop1_tokens = aux['tokens']
    if local_crops is not None and local_crops.shape[1]:
      local_pooled, _ = self.visual(_flatten_views(local_crops), token_stride=0,
                                    differentiated=True)
      image_features.append(_views_by_sample(local_pooled, b))
    z_img = jnp.concatenate(image_features).astype(jnp.float32)        # (Vi, B, E)

    pooled, aux = self.text(_flatten_views(texts), token_stride=texts.shape[1],
                            differentiated=True)
    z_txt = _views_by_sample(pooled, b).astype(jnp.float32)            # (Vt, B, E)
    caption1_tokens = aux['tokens']

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
    image_features, _ = self.encode_image(_flatten_views(global_crops), token_stride=0)
    text_features, _ = self.encode_text(_flatten_views(texts[:, :n_global]), token_stride=0)
    return {'image_features': _views_by_sample(image_features, b),
            'text_features': _views_by_sample(text_features, b)}

  def init_all(self, images: jax.Array, texts: jax.Array) -> Any:
    """Touches every parameter (used by ``init``): images (B, V, H, W, 3), texts (B, V, C)."""
    if self.config.cosmos:
      return self.student(images, None, texts)
    return self(images[:, 0], texts[:, 0])
