"""Model FLOPs of one train step, counted analytically from the architecture.

Only matrix multiplies are counted, at 2 FLOPs per multiply-add (the usual "model FLOPs"
convention, as in MFU): the patch embedding, q/k/v and output projections, attention scores
and the attention-weighted sum, the MLPs, the final projections, COSMOS's token mappings and
both cross-attention poolers (their k/v projections run over the whole context), and the
logits of every loss pair. Elementwise work (LayerNorm, GELU, softmax, AdamW, EMA) is left
out, and so is the recompute of rematerialised blocks: turning remat on makes the step
slower, not the model bigger, so it shows up as a lower fraction of peak.

Conventions, stated so the number can be checked by hand:
  * causal text attention is counted over the full C x C square, as it is computed (masked,
    not skipped);
  * the student's backward is twice its forward (gradients w.r.t. activations and weights),
    including the patch embedding, whose input gradient XLA never computes (about 0.1% of a
    ViT-B/16 step);
  * the teacher runs forward only: its outputs are stop-gradient;
  * the token embedding is a gather, not a matmul, and counts nothing.

``executed`` is what the step really multiplies: the towers' last block computes only the
pooled position (CLS / EOT) of rows whose other positions nothing reads (every teacher row,
the student's local crops, and every view but crop 1 and caption 1), with keys and values
still over all positions. ``total`` counts those blocks in full, as the reference computes
them; the bench reports the fraction of peak of both (``executed``: the hardware's; ``total``:
MFU's model FLOPs, the numerator the official step's fraction uses).
"""

from __future__ import annotations

import dataclasses

from cosmos_jax.models.variants import ModelConfig, TextConfig, VisionConfig


@dataclasses.dataclass(frozen=True)
class StepShape:
  """What one step sees: per-sample views, as the data pipeline yields them."""
  batch: int                 # global batch (samples)
  global_size: int           # pixels of a global crop's side
  local_size: int            # pixels of a local crop's side
  num_local: int = 6
  num_global: int = 2
  num_captions: int = 8      # captions per sample (the first num_global are the global ones)


def linear(rows: int, fan_in: int, fan_out: int) -> int:
  return 2 * rows * fan_in * fan_out


def attention_core(batch: int, q_len: int, kv_len: int, width: int) -> int:
  """Scores Q K^T and the weighted sum A V, summed over heads (heads x head_dim = width)."""
  return 2 * (2 * batch * q_len * kv_len * width)


def transformer(seqs: int, tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
  rows = seqs * tokens
  hidden = int(width * mlp_ratio)
  per_layer = (linear(rows, width, 3 * width) + attention_core(seqs, tokens, tokens, width)
               + linear(rows, width, width)
               + linear(rows, width, hidden) + linear(rows, hidden, width))
  return layers * per_layer


def pooled_only_saving(seqs: int, tokens: int, width: int, mlp_ratio: float) -> int:
  """What the last block skips for ``seqs`` rows computed at one query position only."""
  hidden = int(width * mlp_ratio)
  full = transformer(seqs, tokens, width, 1, mlp_ratio)
  one_query = (linear(seqs, width, width) + linear(seqs * tokens, width, 2 * width)
               + attention_core(seqs, 1, tokens, width) + linear(seqs, width, width)
               + linear(seqs, width, hidden) + linear(seqs, hidden, width))
  return full - one_query


def vision_tower(v: VisionConfig, embed_dim: int, images: int, size: int) -> int:
  """Patch embedding, the transformer on class + patch tokens, the class-token projection."""
  patches = (size // v.patch_size) ** 2
  return (linear(images * patches, 3 * v.patch_size ** 2, v.width)
          + transformer(images, patches + 1, v.width, v.layers, v.mlp_ratio)
          + linear(images, v.width, embed_dim))


def text_tower(t: TextConfig, embed_dim: int, captions: int) -> int:
  """The transformer on all context positions and the projection of the EOT state."""
  return (transformer(captions, t.context_length, t.width, t.layers, t.mlp_ratio)
          + linear(captions, t.width, embed_dim))


def cross_pooler(batch: int, queries: int, context: int, width: int) -> int:
  """LN'd queries over LN'd context: q projection, k/v over the context, attention, output."""
  return (linear(batch * queries, width, width) + linear(batch * context, width, 2 * width)
          + attention_core(batch, queries, context, width)
          + linear(batch * queries, width, width))


def loss_logits(views_a: int, views_b: int, batch: int, embed_dim: int) -> int:
  """One N x N logit matrix per (a, b) view pair (no cross-view negatives)."""
  return views_a * views_b * 2 * batch * batch * embed_dim


def student_forward(config: ModelConfig, s: StepShape) -> dict[str, int]:
  """The student's forward, by part; COSMOS parts only when ``config.cosmos``."""
  v, t, e, b = config.vision, config.text, config.embed_dim, s.batch
  views = s.num_global + s.num_local
  parts = {
      'vision_global': vision_tower(v, e, b * s.num_global, s.global_size),
      # Local crops feed the cross poolers alone: the CLIP-only student does not encode them.
      'vision_local': (vision_tower(v, e, b * s.num_local, s.local_size)
                       if config.cosmos and s.num_local else 0),
      'text': text_tower(t, e, b * s.num_captions),
  }
  # The CLIP loss pairs the global crops with every caption (local crops are left out).
  parts['loss'] = loss_logits(s.num_global, s.num_captions, b, e)
  if config.cosmos:
    patches = (s.global_size // v.patch_size) ** 2
    context = t.context_length
    # Patch tokens of global crop 1 and all positions of caption 1, mapped to embed_dim.
    parts['token_mappings'] = linear(b * patches, v.width, e) + linear(b * context, t.width, e)
    # Every image view queries caption 1's tokens; every caption queries crop 1's patches.
    parts['cross_poolers'] = (cross_pooler(b, views, context, e)
                              + cross_pooler(b, s.num_captions, patches, e))
    # Four distillation terms, each student cross-modal views x the teacher's global views.
    parts['loss'] += 2 * (loss_logits(views, s.num_global, b, e)
                          + loss_logits(s.num_captions, s.num_global, b, e))
  return parts


def teacher_forward(config: ModelConfig, s: StepShape) -> int:
  """Uni-modal embeddings of the global crops and the global captions."""
  if not config.cosmos:
    return 0
  b = s.batch * s.num_global
  return (vision_tower(config.vision, config.embed_dim, b, s.global_size)
          + text_tower(config.text, config.embed_dim, b))


def pooled_only_savings(config: ModelConfig, s: StepShape) -> tuple[int, int]:
  """(student forward, teacher forward) FLOPs the last-block shortcut skips."""
  if not config.cosmos:   # the CLIP-only student reads every row's pooled state only, in full
    return 0, 0
  v, t, b = config.vision, config.text, s.batch
  image = lambda rows, size: pooled_only_saving(rows, (size // v.patch_size) ** 2 + 1, v.width,
                                                v.mlp_ratio)
  text = lambda rows: pooled_only_saving(rows, t.context_length, t.width, t.mlp_ratio)
  student = (image(b * (s.num_global - 1), s.global_size) + image(b * s.num_local, s.local_size)
             + text(b * (s.num_captions - 1)))
  teacher = image(b * s.num_global, s.global_size) + text(b * s.num_global)
  return student, teacher


def train_step_flops(config: ModelConfig, shape: StepShape) -> dict[str, int]:
  """{'student_forward', 'student_backward', 'teacher_forward', 'total', 'executed',
  'by_part': {...}}."""
  parts = student_forward(config, shape)
  forward = sum(parts.values())
  teacher = teacher_forward(config, shape)
  skip_student, skip_teacher = pooled_only_savings(config, shape)
  return {'student_forward': forward, 'student_backward': 2 * forward,
          'teacher_forward': teacher, 'total': 3 * forward + teacher,
          'executed': 3 * (forward - skip_student) + teacher - skip_teacher, 'by_part': parts}


def step_shape(config) -> StepShape:
  """The StepShape of a run config (``cosmos_jax.config`` layout)."""
  d = config.data
  return StepShape(batch=config.batch_size, global_size=d.global_size,
                   local_size=d.local_size, num_local=d.num_local)
