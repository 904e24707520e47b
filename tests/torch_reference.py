"""A PyTorch COSMOS built from open_clip's CLIP and plain torch.nn, for the parity tests.

It has exactly the official state_dict (the 302 open_clip keys plus COSMOS's 21) and follows
the official forward (ExplainableML/cosmos ``CLIP.forward`` and ``MultiCropWrap``) step by
step: DINO-style positional-embedding interpolation for the local crops, one backbone call
per group of equal-size crops, contexts tiled with ``repeat`` for the cross poolers, the
residual on the raw embedding, then ``F.normalize``. Images are NCHW here, as in PyTorch.
"""

from __future__ import annotations

import math

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from cosmos_jax.models.variants import ModelConfig


class CrossPooler(nn.Module):
  """COSMOS's AttentionalCrossPooler: ln_q, ln_k and nn.MultiheadAttention(d, h, kdim=d, vdim=d)."""

  def __init__(self, d: int, heads: int):
    super().__init__()
    self.attn = nn.MultiheadAttention(d, heads, kdim=d, vdim=d)
    self.ln_q = nn.LayerNorm(d)
    self.ln_k = nn.LayerNorm(d)

  def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    x = self.ln_k(x).permute(1, 0, 2)
    q = self.ln_q(q).permute(1, 0, 2)
    return self.attn(q, x, x, need_weights=False)[0].permute(1, 0, 2)


def build(config: ModelConfig, *, perturb: float = 0.02, seed: int = 0) -> nn.Module:
  """open_clip CLIP (+ COSMOS modules when config.cosmos), with every tensor perturbed.

  The perturbation makes LayerNorm scales, biases and zero-initialised tensors non-trivial,
  so a mapping that drops or swaps any of them fails the parity tests.
  """
  torch.manual_seed(seed)
  model = open_clip.model.CLIP(**config.replace(cosmos=False).to_open_clip_json())
  if config.cosmos:
    e, v, t = config.embed_dim, config.vision, config.text
    model.visual.attn_cross_pool = CrossPooler(e, v.attn_pooler_heads)
    model.text_attn_cross_pool = CrossPooler(t.width, t.attn_pooler_heads)
    model.image_token_mapping = nn.Linear(v.width, e)
    model.text_token_mapping = nn.Linear(t.width, e)
    model.distill_logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(perturb * torch.randn_like(p))
  return model.eval()


def interpolate_pos_encoding(visual: nn.Module, n_tokens: int, w: int, h: int) -> torch.Tensor:
  """The official DINO-style resize (scale_factor with the +0.1, bicubic, align_corners=False)."""
  pos = visual.positional_embedding
  npatch, n = n_tokens - 1, pos.shape[0] - 1
  if npatch == n and w == h:
    return pos
  dim = pos.shape[-1]
  w0 = w // visual.patch_size[1] + 0.1
  h0 = h // visual.patch_size[0] + 0.1
  s = int(math.sqrt(n))
  grid = pos[1:].reshape(1, s, s, dim).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode='bicubic')
  grid = grid.permute(0, 2, 3, 1).reshape(-1, dim)
  return torch.cat([pos[:1], grid], dim=0)


def csa_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
  """SCLIP's correlative self-attention on NLD input (as the official ``custom_attn``)."""
  b, l, d = x.shape
  h = attn.num_heads
  q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
  heads = lambda t: t.reshape(b, l, h, d // h).transpose(1, 2)
  q, k, v = heads(q), heads(k), heads(v)
  scale = (d // h) ** -0.5
  weights = F.softmax(q @ q.transpose(-1, -2) * scale, -1) + F.softmax(k @ k.transpose(-1, -2) * scale, -1)
  out = (weights @ v).transpose(1, 2).reshape(b, l, d)
  return attn.out_proj(out)


def visual_forward(visual: nn.Module, x: torch.Tensor, csa: bool = False):
  """Returns (post-ln_post patch tokens, pooled @ proj) for any input size."""
  b, _, w, h = x.shape
  t = visual.conv1(x)
  t = t.reshape(b, t.shape[1], -1).permute(0, 2, 1)
  cls = visual.class_embedding.to(t.dtype).expand(b, 1, -1)
  t = torch.cat([cls, t], dim=1)
  t = t + interpolate_pos_encoding(visual, t.shape[1], w, h).to(t.dtype)
  t = visual.ln_pre(t)
  blocks = visual.transformer.resblocks
  if csa:
    for blk in blocks[:-1]:
      t = blk(t)
    last = blocks[-1]
    t = t + csa_attention(last.attn, last.ln_1(t))
    t = t + last.mlp(last.ln_2(t))
  else:
    t = visual.transformer(t)
  t = visual.ln_post(t)
  return t[:, 1:], t[:, 0] @ visual.proj


def text_forward(model: nn.Module, text: torch.Tensor):
  """Returns (all post-ln_final token states, EOT state @ text_projection)."""
  x = model.token_embedding(text) + model.positional_embedding
  x = model.transformer(x, attn_mask=model.attn_mask)
  x = model.ln_final(x)
  pooled = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ model.text_projection
  return x, pooled


def student_forward(model: nn.Module, images: list[torch.Tensor], texts: torch.Tensor,
                    batch_size: int) -> dict[str, torch.Tensor]:
  """The official student forward: images [g1, g2, l1..], texts (V*B, C) view-major."""
  widths = [im.shape[-1] for im in images]
  features, tokens, start = [], None, 0
  while start < len(images):
    end = start
    while end < len(images) and widths[end] == widths[start]:
      end += 1
    group_tokens, pooled = visual_forward(model.visual, torch.cat(images[start:end]))
    features.append(pooled)
    tokens = group_tokens if tokens is None else tokens
    start = end
  img_features = torch.cat(features)
  img_tokens = model.image_token_mapping(tokens)[:batch_size]
  txt_all_tokens, txt_features = text_forward(model, texts)
  txt_tokens = model.text_token_mapping(txt_all_tokens)[:batch_size]
  img_num = img_features.shape[0] // batch_size
  txt_num = txt_features.shape[0] // batch_size
  pooled_t = model.text_attn_cross_pool(txt_tokens.repeat(img_num, 1, 1), img_features.unsqueeze(1))
  img_cross = F.normalize(img_features + pooled_t.squeeze(1), dim=-1)
  pooled_i = model.visual.attn_cross_pool(img_tokens.repeat(txt_num, 1, 1), txt_features.unsqueeze(1))
  txt_cross = F.normalize(txt_features + pooled_i.squeeze(1), dim=-1)
  return {'image_features': F.normalize(img_features, dim=-1),
          'text_features': F.normalize(txt_features, dim=-1),
          'image_cross': img_cross, 'text_cross': txt_cross}


def clip_loss(a_list: list[torch.Tensor], b_list: list[torch.Tensor], scale) -> torch.Tensor:
  """The official ClipLoss, single process: symmetric CE over every (a, b) view pair."""
  total, count = 0, 0
  for a in a_list:
    for b in b_list:
      logits = scale * a @ b.T
      labels = torch.arange(logits.shape[0])
      total = total + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
      count += 1
  return total / count


def cosmos_total_loss(model: nn.Module, out: dict, teacher_img: torch.Tensor,
                      teacher_txt: torch.Tensor, batch_size: int) -> torch.Tensor:
  """L_CLIP + L_COSMOS as the official train loop wires them (view-major (V*B, E) tensors)."""
  chunk = lambda x: list(x.split(batch_size))
  t_img, t_txt = chunk(teacher_img.detach()), chunk(teacher_txt.detach())
  c_img, c_txt = chunk(out['image_cross']), chunk(out['text_cross'])
  d_scale = model.distill_logit_scale.exp()
  distill = (clip_loss(c_img, t_img, d_scale) + clip_loss(c_img, t_txt, d_scale)
             + clip_loss(c_txt, t_img, d_scale) + clip_loss(c_txt, t_txt, d_scale)) / 4
  clip = clip_loss(chunk(out['image_features'])[:2], chunk(out['text_features']),
                   model.logit_scale.exp())
  return clip + distill


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
  """The official groups: no decay for ndim < 2 or names with bn/ln/bias/logit_scale."""
  exclude = lambda n, p: p.ndim < 2 or any(s in n for s in ('bn', 'ln', 'bias', 'logit_scale'))
  named = list(model.named_parameters())
  return [{'params': [p for n, p in named if exclude(n, p)], 'weight_decay': 0.0},
          {'params': [p for n, p in named if not exclude(n, p)], 'weight_decay': weight_decay}]


def train_step(student: nn.Module, teacher: nn.Module, optimizer, images: list[torch.Tensor],
               texts: torch.Tensor, batch_size: int, momentum: float) -> torch.Tensor:
  """One official step: forward, loss, backward, EMA (before the update), AdamW, clamps."""
  optimizer.zero_grad()
  out = student_forward(student, images, texts, batch_size)
  with torch.no_grad():
    t_img = F.normalize(torch.cat([visual_forward(teacher.visual, im)[1] for im in images[:2]]), dim=-1)
    t_txt = F.normalize(text_forward(teacher, texts[:2 * batch_size])[1], dim=-1)
  loss = cosmos_total_loss(student, out, t_img, t_txt, batch_size)
  loss.backward()
  with torch.no_grad():
    for p_s, p_t in zip(student.parameters(), teacher.parameters()):
      p_t.data.mul_(momentum).add_((1 - momentum) * p_s.detach().data)
  optimizer.step()
  with torch.no_grad():
    for m in (student, teacher):
      m.logit_scale.clamp_(0, math.log(100))
      m.distill_logit_scale.clamp_(0, math.log(100))
  return loss.detach()
