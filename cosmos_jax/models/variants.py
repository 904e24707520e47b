"""Model architectures: typed configs, the named variants, and open_clip model-config JSON.

A variant is chosen by name (``'ViT-B-16'``, also spelled ``'ViT-B/16'`` or ``'vit_b16'``)
or given as an open_clip-style model-config JSON (a path or a JSON string), so every size
open_clip users know can be built and converted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

INIT_LOGIT_SCALE = math.log(1 / 0.07)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  head_width: int = 64
  mlp_ratio: float = 4.0
  attn_pooler_heads: int = 8  # heads of `visual.attn_cross_pool` (COSMOS)

  @property
  def heads(self) -> int:
    return self.width // self.head_width

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_ratio: float = 4.0
  attn_pooler_heads: int = 8  # heads of `text_attn_cross_pool` (COSMOS)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A two-tower CLIP; with ``cosmos=True`` plus COSMOS's cross poolers and token mappings."""
  embed_dim: int = 512
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  cosmos: bool = True
  init_logit_scale: float = INIT_LOGIT_SCALE
  name: str = 'custom'

  def __post_init__(self):
    v, t = self.vision, self.text
    problems = []
    if v.width % v.head_width:
      problems.append(f'vision width {v.width} is not a multiple of head_width {v.head_width}')
    if v.image_size % v.patch_size:
      problems.append(f'vision image_size {v.image_size} is not a multiple of patch_size {v.patch_size}')
    if t.width % t.heads:
      problems.append(f'text width {t.width} is not divisible by text heads {t.heads}')
    if self.cosmos:
      # The reference builds `text_attn_cross_pool` with the text width and feeds it the
      # embed_dim image embedding as query, so the two must agree.
      if t.width != self.embed_dim:
        problems.append(f'COSMOS needs text width == embed_dim (got {t.width} and {self.embed_dim})')
      if self.embed_dim % v.attn_pooler_heads:
        problems.append(f'embed_dim {self.embed_dim} is not divisible by vision attn_pooler_heads '
                        f'{v.attn_pooler_heads}')
      if t.width % t.attn_pooler_heads:
        problems.append(f'text width {t.width} is not divisible by text attn_pooler_heads '
                        f'{t.attn_pooler_heads}')
    if problems:
      raise ValueError(f'invalid model config {self.name!r}: ' + '; '.join(problems))

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)

  def to_open_clip_json(self) -> dict[str, Any]:
    """The open_clip model-config dict.

    Upstream open_clip's text config has no ``attn_pooler_heads`` (the COSMOS fork added it),
    so it is written only for COSMOS models.
    """
    text = {f.name: getattr(self.text, f.name) for f in dataclasses.fields(TextConfig)}
    if not self.cosmos:
      del text['attn_pooler_heads']
    return {
        'embed_dim': self.embed_dim,
        'vision_cfg': {f.name: getattr(self.vision, f.name) for f in dataclasses.fields(VisionConfig)},
        'text_cfg': text,
    }


def _cfg(name, embed_dim, vision, text) -> ModelConfig:
  return ModelConfig(embed_dim=embed_dim, vision=VisionConfig(**vision), text=TextConfig(**text),
                     name=name)


# Values from open_clip's model_configs (GELU variants, not -quickgelu).
VARIANTS: dict[str, ModelConfig] = {
    # For tests and the CPU demo: 32 px images, 8 px patches (4x4 grid; 16 px local crops
    # give a 2x2 grid), the real 49,408-token vocabulary and 77 positions.
    'tiny': _cfg('tiny', 64,
                 dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32,
                      attn_pooler_heads=4),
                 dict(width=64, heads=2, layers=2, attn_pooler_heads=4)),
    'ViT-S-16': _cfg('ViT-S-16', 384,
                     dict(image_size=224, patch_size=16, width=384, layers=12),
                     dict(width=384, heads=6, layers=12)),
    'ViT-B-32': _cfg('ViT-B-32', 512,
                     dict(image_size=224, patch_size=32, width=768, layers=12),
                     dict(width=512, heads=8, layers=12)),
    'ViT-B-16': _cfg('ViT-B-16', 512,
                     dict(image_size=224, patch_size=16, width=768, layers=12),
                     dict(width=512, heads=8, layers=12)),
    'ViT-L-14': _cfg('ViT-L-14', 768,
                     dict(image_size=224, patch_size=14, width=1024, layers=24),
                     dict(width=768, heads=12, layers=12)),
}


def _canonical(name: str) -> str:
  s = re.sub(r'[^a-z0-9]', '', name.lower())
  return s


_ALIASES = {_canonical(k): k for k in VARIANTS}


def from_open_clip_json(cfg: Mapping[str, Any] | str, *, name: str = 'custom',
                        cosmos: bool = True) -> ModelConfig:
  """Builds a ModelConfig from an open_clip model-config dict, JSON string or JSON file path."""
  if isinstance(cfg, str):
    if os.path.exists(cfg):
      name = os.path.splitext(os.path.basename(cfg))[0] if name == 'custom' else name
      with open(cfg) as f:
        cfg = json.load(f)
    else:
      cfg = json.loads(cfg)
  known_top = {'embed_dim', 'vision_cfg', 'text_cfg', 'quick_gelu', 'custom_text'}
  unknown = set(cfg) - known_top
  if unknown:
    raise ValueError(f'model config {name!r}: unsupported fields {sorted(unknown)}')
  if cfg.get('quick_gelu'):
    raise ValueError(f'model config {name!r}: quick_gelu is not supported (COSMOS uses exact GELU)')
  sections = {'vision_cfg': VisionConfig, 'text_cfg': TextConfig}
  parsed = {}
  for key, cls in sections.items():
    sub = dict(cfg.get(key, {}))
    allowed = {f.name for f in dataclasses.fields(cls)}
    bad = set(sub) - allowed
    if bad:
      raise ValueError(f'model config {name!r}: unsupported {key} fields {sorted(bad)} '
                       f'(supported: {sorted(allowed)})')
    for k, v in sub.items():
      if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError(f'model config {name!r}: {key}.{k} must be a number, got {v!r}')
    parsed[key] = cls(**sub)
  if 'embed_dim' not in cfg:
    raise ValueError(f'model config {name!r}: missing embed_dim')
  return ModelConfig(embed_dim=int(cfg['embed_dim']), vision=parsed['vision_cfg'],
                     text=parsed['text_cfg'], cosmos=cosmos, name=name)


def get_variant(name_or_json: str, *, cosmos: bool = True) -> ModelConfig:
  """A named variant, an open_clip model-config JSON file, or a JSON string."""
  key = _ALIASES.get(_canonical(name_or_json))
  if key is not None:
    return VARIANTS[key].replace(cosmos=cosmos)
  stripped = name_or_json.strip()
  if stripped.startswith('{') or stripped.endswith('.json') or os.path.exists(stripped):
    if stripped.endswith('.json') and not os.path.exists(stripped):
      raise FileNotFoundError(f'model config file not found: {stripped}')
    return from_open_clip_json(stripped, cosmos=cosmos)
  raise ValueError(f'unknown model variant {name_or_json!r}; known: {", ".join(VARIANTS)}, '
                   'or a path to an open_clip model-config JSON')
