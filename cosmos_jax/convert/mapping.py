"""The Flax <-> PyTorch (open_clip / COSMOS) parameter mapping, as a declarative table.

Each rule maps a regex over '/'-joined Flax paths to a torch key template plus a named
transform (a fixed axis permutation, applied Flax -> torch; its inverse for the way back).
Expected shapes come from the model config, so both directions check every key: a missing,
unexpected or mis-shaped key raises `ConversionError` naming the key and both shapes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from cosmos_jax.models.stacking import stack_layers, unstack_layers
from cosmos_jax.models.variants import VARIANTS, ModelConfig, TextConfig, VisionConfig


class ConversionError(ValueError):
  """A checkpoint does not match the expected layout, or cannot be read."""


# Axis permutations, written Flax -> torch; each has its inverse under its own name.
TRANSFORMS: dict[str, tuple[int, ...] | None] = {
    'identity': None,
    'transpose_2d': (1, 0),             # Dense kernel (in, out) <-> nn.Linear weight (out, in)
    'conv_hwio_to_oihw': (3, 2, 0, 1),  # Conv kernel (kh, kw, I, O) -> torch (O, I, kh, kw)
    'conv_oihw_to_hwio': (2, 3, 1, 0),
}
INVERSE = {'identity': 'identity', 'transpose_2d': 'transpose_2d',
           'conv_hwio_to_oihw': 'conv_oihw_to_hwio', 'conv_oihw_to_hwio': 'conv_hwio_to_oihw'}


@dataclasses.dataclass(frozen=True)
class Rule:
  flax: str  # regex, matched against the whole Flax path
  torch: str  # template for `re.Match.expand`
  transform: str = 'identity'  # Flax -> torch


def _ln(f: str, t: str) -> list[Rule]:
  return [Rule(f + '/scale', t + '.weight'), Rule(f + '/bias', t + '.bias')]


def _dense(f: str, t: str) -> list[Rule]:
  return [Rule(f + '/kernel', t + '.weight', 'transpose_2d'), Rule(f + '/bias', t + '.bias')]


def _mha(f: str, t: str) -> list[Rule]:
  # The packed q/k/v projection stays in torch layout on the Flax side.
  return [Rule(f + '/in_proj_weight', t + '.in_proj_weight'),
          Rule(f + '/in_proj_bias', t + '.in_proj_bias'), *_dense(f + '/out_proj', t + '.out_proj')]


def _tower(f: str, t: str) -> list[Rule]:
  fb, tb = f + r'transformer/resblocks_(?P<i>\d+)', t + r'transformer.resblocks.\g<i>'
  return [*_ln(fb + '/(?P<ln>ln_[12])', tb + r'.\g<ln>'), *_mha(fb + '/attn', tb + '.attn'),
          *_dense(fb + '/mlp/(?P<fc>c_fc|c_proj)', tb + r'.mlp.\g<fc>')]


def _pooler(f: str, t: str) -> list[Rule]:
  return [*_ln(f + '/(?P<ln>ln_[qk])', t + r'.\g<ln>'), *_mha(f + '/attn', t + '.attn')]


# open_clip's CLIP keeps the text tower at the root (no `text.` prefix).
RULES: tuple[Rule, ...] = (
    Rule('visual/conv1/kernel', 'visual.conv1.weight', 'conv_hwio_to_oihw'),
    Rule('visual/(?P<n>class_embedding|positional_embedding|proj)', r'visual.\g<n>'),
    *_ln('visual/(?P<ln>ln_pre|ln_post)', r'visual.\g<ln>'),
    *_tower('visual/', 'visual.'),
    *_pooler('visual/attn_cross_pool', 'visual.attn_cross_pool'),
    Rule('text/token_embedding/embedding', 'token_embedding.weight'),
    Rule('text/(?P<n>positional_embedding|text_projection)', r'\g<n>'),
    *_ln('text/ln_final', 'ln_final'),
    *_tower('text/', ''),
    *_pooler('text_attn_cross_pool', 'text_attn_cross_pool'),
    *_dense('(?P<m>image_token_mapping|text_token_mapping)', r'\g<m>'),
    Rule('(?P<n>logit_scale|distill_logit_scale)', r'\g<n>'),
)
_COMPILED = tuple((re.compile(r.flax), r) for r in RULES)

# Torch modules that exist only in COSMOS models (21 tensors); open_clip export drops them.
COSMOS_MODULES = ('distill_logit_scale', 'visual.attn_cross_pool', 'text_attn_cross_pool',
                  'image_token_mapping', 'text_token_mapping')


def is_cosmos_key(torch_key: str) -> bool:
  return any(torch_key == m or torch_key.startswith(m + '.') for m in COSMOS_MODULES)


def flax_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The Flax parameter tree of `config`, '/'-joined path -> shape."""
  v, t, e = config.vision, config.text, config.embed_dim
  w, wt, p, g = v.width, t.width, v.patch_size, v.grid_size

  def block(prefix: str, d: int, mlp_ratio: float, layers: int) -> dict:
    h = int(d * mlp_ratio)
    out = {}
    for i in range(layers):
      b = f'{prefix}/transformer/resblocks_{i}'
      out.update({f'{b}/ln_1/scale': (d,), f'{b}/ln_1/bias': (d,),
                  f'{b}/attn/in_proj_weight': (3 * d, d), f'{b}/attn/in_proj_bias': (3 * d,),
                  f'{b}/attn/out_proj/kernel': (d, d), f'{b}/attn/out_proj/bias': (d,),
                  f'{b}/ln_2/scale': (d,), f'{b}/ln_2/bias': (d,),
                  f'{b}/mlp/c_fc/kernel': (d, h), f'{b}/mlp/c_fc/bias': (h,),
                  f'{b}/mlp/c_proj/kernel': (h, d), f'{b}/mlp/c_proj/bias': (d,)})
    return out

  def pooler(prefix: str, d: int) -> dict:
    return {f'{prefix}/{n}': s for n, s in [
        ('ln_q/scale', (d,)), ('ln_q/bias', (d,)), ('ln_k/scale', (d,)), ('ln_k/bias', (d,)),
        ('attn/in_proj_weight', (3 * d, d)), ('attn/in_proj_bias', (3 * d,)),
        ('attn/out_proj/kernel', (d, d)), ('attn/out_proj/bias', (d,))]}

  shapes = {
      'visual/conv1/kernel': (p, p, 3, w), 'visual/class_embedding': (w,),
      'visual/positional_embedding': (1 + g * g, w),
      'visual/ln_pre/scale': (w,), 'visual/ln_pre/bias': (w,),
      **block('visual', w, v.mlp_ratio, v.layers),
      'visual/ln_post/scale': (w,), 'visual/ln_post/bias': (w,), 'visual/proj': (w, e),
      'text/token_embedding/embedding': (t.vocab_size, wt),
      'text/positional_embedding': (t.context_length, wt),
      **block('text', wt, t.mlp_ratio, t.layers),
      'text/ln_final/scale': (wt,), 'text/ln_final/bias': (wt,), 'text/text_projection': (wt, e),
      'logit_scale': (),
  }
  if config.cosmos:
    shapes.update({**pooler('visual/attn_cross_pool', e), **pooler('text_attn_cross_pool', wt),
                   'image_token_mapping/kernel': (w, e), 'image_token_mapping/bias': (e,),
                   'text_token_mapping/kernel': (wt, e), 'text_token_mapping/bias': (e,),
                   'distill_logit_scale': ()})
  return shapes


@dataclasses.dataclass(frozen=True)
class Entry:
  flax: str
  torch: str
  transform: str  # Flax -> torch
  flax_shape: tuple[int, ...]
  torch_shape: tuple[int, ...]


def _permute(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  perm = TRANSFORMS[transform]
  return shape if perm is None else tuple(shape[a] for a in perm)


def key_table(config: ModelConfig) -> list[Entry]:
  """One entry per parameter of `config`, matched to its torch key by the first fitting rule."""
  table = []
  for path, shape in flax_shapes(config).items():
    for regex, rule in _COMPILED:
      m = regex.fullmatch(path)
      if m:
        table.append(Entry(path, m.expand(rule.torch), rule.transform, shape,
                           _permute(shape, rule.transform)))
        break
    else:
      raise AssertionError(f'no conversion rule for Flax parameter {path}')
  return table


def torch_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  return {e.torch: e.torch_shape for e in key_table(config)}


def _to_numpy(x: Any) -> np.ndarray:
  """torch tensors (bfloat16 through float32, kept bfloat16 via ml_dtypes), jax or numpy arrays."""
  if hasattr(x, 'detach'):  # torch, without importing it
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      import ml_dtypes
      return x.float().numpy().astype(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


def _cast(x: np.ndarray, dtype: Any) -> np.ndarray:
  is_float = np.issubdtype(x.dtype, np.floating) or x.dtype.name == 'bfloat16'
  return x.astype(dtype) if dtype is not None and is_float else x


def _listing(what: str, items: list[str], limit: int = 12) -> str:
  more = f', and {len(items) - limit} more' if len(items) > limit else ''
  return f'{len(items)} {what}: ' + ', '.join(items[:limit]) + more


def _check(got: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], side: str,
           config: ModelConfig) -> None:
  """Raises one ConversionError naming every missing, unexpected and mis-shaped key."""
  shape = lambda k: tuple(np.shape(got[k]))
  missing = [k for k in expected if k not in got]
  extra = [k for k in got if k not in expected]
  bad = [k for k in expected if k in got and shape(k) != tuple(expected[k])]
  problems = []
  if missing:
    problems.append(_listing('missing key(s)',
                             [f'{k} (expected shape {expected[k]})' for k in missing]))
  if extra:
    problems.append(_listing('unexpected key(s)', [f'{k} (shape {shape(k)})' for k in extra]))
  if bad:
    problems.append(_listing('mis-shaped key(s)', [
        f'{k}: expected shape {tuple(expected[k])} from the config, got {shape(k)}' for k in bad]))
  if not problems:
    return
  hint = ''
  if extra and all(k.startswith('module.') for k in extra):
    hint = " (keys start with 'module.': a DDP/training checkpoint; use split_checkpoint first)"
  elif missing and not extra and not bad and all(is_cosmos_key(k) for k in missing):
    hint = ' (only the COSMOS-only keys are missing: a plain open_clip CLIP, use cosmos=False)'
  kind = 'COSMOS' if config.cosmos else 'CLIP'
  raise ConversionError(f'{side} does not match model {config.name!r} ({kind}){hint}: '
                        + '; '.join(problems))


def check_params(params: Mapping[str, Any], config: ModelConfig) -> None:
  """Raises ConversionError unless the Flax tree has exactly the parameters of `config`
  (in either block layout: ``models/stacking.py``)."""
  _check(traverse_util.flatten_dict(unstack_layers(params), sep='/'), flax_shapes(config),
         'Flax params', config)


def flax_to_torch(params: Mapping[str, Any], config: ModelConfig,
                  dtype: Any = None) -> dict[str, np.ndarray]:
  """Flax params (nested dict) -> open_clip/COSMOS state dict of numpy arrays.

  `dtype=None` keeps each array's dtype; otherwise floating arrays are cast to it. Scanned
  parameters (``model.scan_layers``) are unstacked into the torch keys of each block.
  """
  flat = traverse_util.flatten_dict(unstack_layers(_numpy_tree(params)), sep='/')
  table = key_table(config)
  _check(flat, {e.flax: e.flax_shape for e in table}, 'Flax params', config)
  out = {}
  for e in table:
    perm = TRANSFORMS[e.transform]
    x = _cast(_to_numpy(flat[e.flax]), dtype)
    out[e.torch] = np.asarray(x if perm is None else x.transpose(perm), order='C')
  return out


def torch_to_flax(state_dict: Mapping[str, Any], config: ModelConfig,
                  dtype: Any = np.float32, *, scan_layers: bool = False) -> dict[str, Any]:
  """open_clip/COSMOS state dict (torch tensors or arrays) -> nested dict of numpy arrays.

  Floating arrays are cast to `dtype` (float32 by default; bfloat16 sources are read through
  float32); `dtype=None` keeps the source dtype, bfloat16 as `ml_dtypes.bfloat16`.
  ``scan_layers``: the blocks in the scanned layout (``models/stacking.py``).
  """
  table = key_table(config)
  _check(state_dict, {e.torch: e.torch_shape for e in table}, 'state dict', config)
  flat = {}
  for e in table:
    perm = TRANSFORMS[INVERSE[e.transform]]
    x = _cast(_to_numpy(state_dict[e.torch]), dtype)
    flat[e.flax] = np.asarray(x if perm is None else x.transpose(perm), order='C')
  params = traverse_util.unflatten_dict(flat, sep='/')
  return stack_layers(params) if scan_layers else params


def _numpy_tree(params: Mapping[str, Any]) -> Any:
  """Leaves as numpy arrays (unstacking then slices on the host, not on a device)."""
  return {k: _numpy_tree(v) if isinstance(v, Mapping) else _to_numpy(v) for k, v in params.items()}


def has_cosmos_keys(state_dict: Mapping[str, Any]) -> bool:
  return any(is_cosmos_key(k) for k in state_dict)


def _layers(state_dict: Mapping[str, Any], prefix: str) -> int:
  found = {int(m.group(1)) for k in state_dict
           if (m := re.match(re.escape(prefix) + r'(\d+)\.', k))}
  return max(found) + 1 if found else 0


def infer_config(state_dict: Mapping[str, Any], cosmos: bool | None = None) -> ModelConfig:
  """The architecture of an open_clip/COSMOS state dict, recovered from its shapes.

  Head counts are not in the shapes: the result uses open_clip's standard 64-wide heads (and
  8 cross-pooler heads) unless the shapes equal a named variant, which is then returned.
  """
  needed = ('visual.conv1.weight', 'visual.positional_embedding', 'visual.proj',
            'visual.transformer.resblocks.0.mlp.c_fc.weight', 'token_embedding.weight',
            'positional_embedding', 'transformer.resblocks.0.mlp.c_fc.weight')
  missing = [k for k in needed if k not in state_dict]
  if missing:
    raise ConversionError('cannot infer the architecture: the state dict lacks '
                          f'{", ".join(missing)}; is it an open_clip ViT CLIP? (or pass a variant)')
  shape = lambda k: tuple(np.shape(state_dict[k]))
  if cosmos is None:
    cosmos = has_cosmos_keys(state_dict)
  w, _, p, _ = shape('visual.conv1.weight')
  n = shape('visual.positional_embedding')[0] - 1
  g = math.isqrt(n)
  if g * g != n:
    raise ConversionError(f'visual.positional_embedding has {n} patch positions, not a square grid')
  vocab, wt = shape('token_embedding.weight')
  standard = not (w % 64 or wt % 64)  # open_clip's 64-wide heads, else one head for now
  vision = VisionConfig(
      image_size=g * p, patch_size=p, width=w, head_width=64 if standard else w,
      layers=_layers(state_dict, 'visual.transformer.resblocks.'),
      mlp_ratio=shape('visual.transformer.resblocks.0.mlp.c_fc.weight')[0] / w)
  text = TextConfig(
      context_length=shape('positional_embedding')[0], vocab_size=vocab, width=wt,
      heads=wt // 64 if standard else 1, layers=_layers(state_dict, 'transformer.resblocks.'),
      mlp_ratio=shape('transformer.resblocks.0.mlp.c_fc.weight')[0] / wt)
  try:
    config = ModelConfig(embed_dim=shape('visual.proj')[1], vision=vision, text=text, cosmos=cosmos)
  except ValueError as e:
    raise ConversionError(f'the inferred architecture is invalid ({e}); pass a variant') from e
  inferred = flax_shapes(config)
  for variant in VARIANTS.values():
    candidate = variant.replace(cosmos=cosmos)
    if flax_shapes(candidate) == inferred:
      return candidate
  if not standard:
    raise ConversionError(f'widths {w} (vision) and {wt} (text) are not multiples of 64, so the '
                          'head counts cannot be assumed; pass a variant (name or JSON)')
  return config
