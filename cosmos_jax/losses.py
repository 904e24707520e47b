"""COSMOS losses: multi-view symmetric InfoNCE (CLIP) and cross-modal self-distillation.

All losses run in float32 whatever the feature dtype. Features are the GLOBAL
batch: the official code all-gathers features across ranks and every rank
computes the full loss, so differentiating this loss gives world_size times the
gradient of one official rank (DDP averages); AdamW is insensitive to that.
"""

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cosmos_jax import losses_sharded

# Metric name: (student cross-modal stack, teacher uni-modal stack), in the reference's order.
_DISTILL_TERMS = {
    'distill_i2i': ('image_cross', 'teacher_image'),
    'distill_i2t': ('image_cross', 'teacher_text'),
    'distill_t2i': ('text_cross', 'teacher_image'),
    'distill_t2t': ('text_cross', 'teacher_text'),
}
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


def _contrastive_terms(stacks: Mapping[str, jax.Array], scales: Mapping[str, jax.Array],
                       terms: Sequence[losses_sharded.Term], mesh: Optional[Mesh],
                       batch_axes: Sequence[str]) -> list[jax.Array]:
  """``clip_loss`` of each (a, b, scale) term: on global arrays, or per device when the batch
  is split over more than one device of ``mesh`` (same value, explicit collectives)."""
  stacks = {k: jnp.asarray(v, jnp.float32) for k, v in stacks.items()}
  scales = {k: jnp.asarray(v, jnp.float32) for k, v in scales.items()}
  if mesh is not None and losses_sharded.batch_shards(mesh, batch_axes) > 1:
    return losses_sharded.sharded_clip_losses(stacks, scales, terms, mesh, batch_axes,
                                              _PAIR_LOGITS_BYTES)
  return [clip_loss(stacks[a], stacks[b], scales[s]) for a, b, s in terms]


def cosmos_loss(img_cross: jax.Array, txt_cross: jax.Array,
                teacher_img: jax.Array, teacher_txt: jax.Array,
                distill_scale: jax.Array) -> dict[str, jax.Array]:
  """Cross-modal self-distillation: student cross-modal vs teacher uni-modal.

  Four terms (cI->gI, cI->gT, cT->gI, cT->gT), each a clip_loss over all
  student x teacher view pairs, same-view pairs included; `distill_loss` is
  their mean. `distill_scale` is the exponentiated distill logit scale.
  """
  stacks = {'image_cross': img_cross, 'text_cross': txt_cross,
            'teacher_image': jax.lax.stop_gradient(teacher_img),
            'teacher_text': jax.lax.stop_gradient(teacher_txt)}
  terms = [(a, b, 'distill') for a, b in _DISTILL_TERMS.values()]
  values = _contrastive_terms(stacks, {'distill': distill_scale}, terms, None, ())
  out = dict(zip(_DISTILL_TERMS, values))
  out['distill_loss'] = sum(values) / 4.0
  return out


def cosmos_objective(
    student: Mapping[str, Any],
    teacher: Optional[Mapping[str, Any]],
    *,
    distill: bool = True,
    mesh: Optional[Mesh] = None,
    batch_axes: Sequence[str] = ('data', 'fsdp'),
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
    mesh: where N is split over more than one device of ``batch_axes`` of this
      mesh, the terms are computed per device with explicit collectives
      (``losses_sharded``); otherwise (None, one device) on global arrays.
    batch_axes: the mesh axes N is split over, in the order of its sharding.

  Returns:
    (total, metrics) with metrics 'clip_loss', the four distill terms,
    'distill_loss' and 'total_loss' (no distill entries when distill is False).
  """
  # Local image crops are left out of L_CLIP, as in the reference ("results in
  # overfitting"): 2 global crops x all captions.
  stacks = {'image': student['image_features'][:2], 'text': student['text_features']}
  scales = {'clip': jnp.exp(jnp.asarray(student['logit_scale'], jnp.float32))}
  terms = [('image', 'text', 'clip')]
  if distill:
    if teacher is None:
      raise ValueError('cosmos_objective(distill=True) needs teacher features.')
    for key in ('image_features', 'text_features'):
      if teacher[key].shape[0] != 2:
        raise ValueError(
            f"teacher['{key}'] must hold the 2 global views, got shape "
            f'{teacher[key].shape}.')
    stacks.update(image_cross=student['image_cross'], text_cross=student['text_cross'],
                  teacher_image=jax.lax.stop_gradient(teacher['image_features']),
                  teacher_text=jax.lax.stop_gradient(teacher['text_features']))
    scales['distill'] = jnp.exp(
        jnp.asarray(student['distill_logit_scale'], jnp.float32))
    terms += [(a, b, 'distill') for a, b in _DISTILL_TERMS.values()]
  values = _contrastive_terms(stacks, scales, terms, mesh, batch_axes)
  metrics = {'clip_loss': values[0]}
  total = metrics['clip_loss']
  if distill:
    metrics.update(zip(_DISTILL_TERMS, values[1:]))
    metrics['distill_loss'] = sum(values[1:]) / 4.0
    total = total + metrics['distill_loss']
  metrics['total_loss'] = total
  return total, metrics
