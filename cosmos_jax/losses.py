"""COSMOS losses: multi-view symmetric InfoNCE (CLIP) and cross-modal self-distillation.

All losses run in float32 whatever the feature dtype. Features are the GLOBAL
batch: the official code all-gathers features across ranks and every rank
computes the full loss, so differentiating this loss gives world_size times the
gradient of one official rank (DDP averages); AdamW is insensitive to that.
"""

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from cosmos_jax.models.layers import l2_normalize  # noqa: F401  (re-exported)

_DISTILL_TERMS = ('distill_i2i', 'distill_i2t', 'distill_t2i', 'distill_t2t')
# Float32 logits of the view pairs one scan step of clip_loss holds (N = 4096: one pair).
_PAIR_LOGITS_BYTES = 64 << 20


@jax.checkpoint
def _pair_loss(a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE of one (N, E) x (N, E) view pair, matched rows positive."""
  # Default matmul precision on purpose: the reference runs this matmul under
  # autocast (fp16); the softmax and CE below stay float32.
  logits = scale * jnp.matmul(a, b.T)
  diag = jnp.diagonal(logits)
  row = jax.nn.logsumexp(logits, axis=1)  # CE(logits, arange N) per row.
  col = jax.nn.logsumexp(logits, axis=0)  # CE(logits.T, arange N) per row.
  return 0.5 * (jnp.mean(row - diag) + jnp.mean(col - diag))


def clip_loss(a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
  """Mean symmetric InfoNCE over all Va x Vb view pairs of a (Va,N,E), b (Vb,N,E).

  `scale` is the exponentiated logit scale. Each pair is its own N x N problem
  (no cross-view negatives), as in the official ClipLoss.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)
  if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:]:
    raise ValueError(
        f'clip_loss expects (Va, N, E) and (Vb, N, E), got {a.shape} and '
        f'{b.shape}.')
  # Pairs run in groups of at most _PAIR_LOGITS_BYTES of logits, one group
  # after another (lax.map is a scan), each rematerialised: at batch 4096 one
  # N x N block is live at a time instead of Va*Vb of them. Small batches take
  # all pairs in one vectorised group, since a scan step per pair costs more in
  # loop overhead than the pair itself (tiny: 2,500 of 4,400 ops in the step).
  ii, jj = jnp.meshgrid(jnp.arange(a.shape[0]), jnp.arange(b.shape[0]),
                        indexing='ij')
  pairs_per_group = max(1, min(ii.size, _PAIR_LOGITS_BYTES // (4 * a.shape[1] ** 2)))
  per_pair = jax.lax.map(lambda ij: _pair_loss(a[ij[0]], b[ij[1]], scale),
                         (ii.ravel(), jj.ravel()), batch_size=pairs_per_group)
  return jnp.mean(per_pair)


def cosmos_loss(img_cross: jax.Array, txt_cross: jax.Array,
                teacher_img: jax.Array, teacher_txt: jax.Array,
                distill_scale: jax.Array) -> dict[str, jax.Array]:
  """Cross-modal self-distillation: student cross-modal vs teacher uni-modal.

  Four terms (cI->gI, cI->gT, cT->gI, cT->gT), each a clip_loss over all
  student x teacher view pairs, same-view pairs included; `distill_loss` is
  their mean. `distill_scale` is the exponentiated distill logit scale.
  """
  teacher_img = jax.lax.stop_gradient(teacher_img)
  teacher_txt = jax.lax.stop_gradient(teacher_txt)
  terms = (
      clip_loss(img_cross, teacher_img, distill_scale),
      clip_loss(img_cross, teacher_txt, distill_scale),
      clip_loss(txt_cross, teacher_img, distill_scale),
      clip_loss(txt_cross, teacher_txt, distill_scale),
  )
  out = dict(zip(_DISTILL_TERMS, terms))
  out['distill_loss'] = sum(terms) / 4.0
  return out


def cosmos_objective(
    student: Mapping[str, Any],
    teacher: Optional[Mapping[str, Any]],
    *,
    distill: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total COSMOS loss L_CLIP + L_COSMOS and its metrics.

  Args:
    student: 'image_features' (n_img_views, N, E) ordered [global1, global2,
      local...], 'text_features' (n_txt_views, N, E), 'image_cross' and
      'text_cross' of the same shapes, and the log-space scalars 'logit_scale'
      and 'distill_logit_scale'.
    teacher: 'image_features' and 'text_features', each (2, N, E); may be None
      when distill is False.
    distill: False gives the CLIP-only baseline (total = clip_loss).

  Returns:
    (total, metrics) with metrics 'clip_loss', the four distill terms,
    'distill_loss' and 'total_loss' (no distill entries when distill is False).
  """
  # Local image crops are left out of L_CLIP, as in the reference ("results in
  # overfitting"): 2 global crops x all captions.
  metrics = {
      'clip_loss': clip_loss(
          student['image_features'][:2], student['text_features'],
          jnp.exp(jnp.asarray(student['logit_scale'], jnp.float32))),
  }
  total = metrics['clip_loss']
  if distill:
    if teacher is None:
      raise ValueError('cosmos_objective(distill=True) needs teacher features.')
    for key in ('image_features', 'text_features'):
      if teacher[key].shape[0] != 2:
        raise ValueError(
            f"teacher['{key}'] must hold the 2 global views, got shape "
            f'{teacher[key].shape}.')
    metrics.update(cosmos_loss(
        student['image_cross'], student['text_cross'],
        teacher['image_features'], teacher['text_features'],
        jnp.exp(jnp.asarray(student['distill_logit_scale'], jnp.float32))))
    total = total + metrics['distill_loss']
  metrics['total_loss'] = total
  return total, metrics
