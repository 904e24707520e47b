"""A quick look at any weights: encode a few drawn scenes and their captions, print similarities.

Shows the moving parts end to end: a named variant (or weights converted from PyTorch or a
training run), the evaluation transform, the CLIP tokenizer and the jitted encoders. With
random weights the matrix is noise; with trained weights the diagonal wins.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from cosmos_jax import models, tokenizer
from cosmos_jax.data.augment import eval_transform

COLORS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220),
          'yellow': (235, 205, 40)}
SHAPES = ('circle', 'square', 'triangle')


@dataclasses.dataclass
class SimilarityResult:
  captions: list[str]
  similarity: np.ndarray  # (images, captions), exp(logit_scale) * cosine
  seconds: float


def draw_scene(shape: str, color: str, size: int = 224) -> Image.Image:
  """One coloured shape on a light textured background."""
  rng = np.random.default_rng(zlib.crc32(f'{shape}/{color}'.encode()))
  background = 225 + rng.integers(-12, 12, (size, size, 3))
  image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  lo, hi = size // 5, 4 * size // 5
  fill = COLORS[color]
  if shape == 'circle':
    draw.ellipse((lo, lo, hi, hi), fill=fill)
  elif shape == 'square':
    draw.rectangle((lo, lo, hi, hi), fill=fill)
  else:
    draw.polygon([(size // 2, lo), (lo, hi), (hi, hi)], fill=fill)
  return image


def run(variant: str = 'tiny', params: Optional[dict] = None, n: int = 4,
        seed: int = 0) -> SimilarityResult:
  config = models.get_variant(variant) if isinstance(variant, str) else variant
  if params is None:
    params = models.init_params(config, jax.random.key(seed))
  pairs = [(SHAPES[i % len(SHAPES)], list(COLORS)[i % len(COLORS)]) for i in range(n)]
  size = config.vision.image_size
  images = np.stack([eval_transform(draw_scene(s, c, 2 * size), size) for s, c in pairs])
  captions = [f'a photo of a {c} {s}.' for s, c in pairs]
  text = tokenizer.tokenize(captions, config.text.context_length)
  model = models.CLIP(config)
  start = time.perf_counter()
  out = jax.jit(model.apply)({'params': params}, jnp.asarray(images), jnp.asarray(text))
  sim = out['logit_scale'] * out['image_features'] @ out['text_features'].T
  sim = np.asarray(jax.block_until_ready(sim))
  return SimilarityResult(captions, sim, time.perf_counter() - start)


def format_result(result: SimilarityResult) -> str:
  lines = ['similarity = exp(logit_scale) * cos(image, caption); rows: images, columns: captions']
  for j, caption in enumerate(result.captions):
    lines.append(f'  [{j}] {caption}')
  lines.append(' ' * 10 + ''.join(f'{f"[{j}]":>9}' for j in range(len(result.captions))))
  for i, row in enumerate(result.similarity):
    best = int(np.argmax(row))
    cells = ''.join(f'{v:9.3f}' if j != best else f'{v:8.3f}*' for j, v in enumerate(row))
    lines.append(f'image {i:<3} {cells}')
  correct = int(np.sum(np.argmax(result.similarity, 1) == np.arange(len(result.captions))))
  lines.append(f'top-1 image->caption: {correct}/{len(result.captions)} '
               f'(chance {1 / len(result.captions):.0%}); encode + compile {result.seconds:.1f} s')
  return '\n'.join(lines)
