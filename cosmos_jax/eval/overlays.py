"""Segmentation overlays a person can read: image | ground truth | prediction, and a legend.

Label maps are drawn in the PASCAL VOC colours, opaque (a blend with the image mixes an
object's own colour into its class colour and the legend no longer matches); every panel is enlarged by an
integer factor with nearest-neighbour sampling (so each label pixel stays a sharp square) until
its shorter side is at least ``min_panel`` pixels, and a legend under the panels names the
colour of every class that appears in either map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOUR = (255, 255, 255)
_GAP = 8            # pixels between panels
_TITLE_H = 22       # title strip above the panels
_SWATCH = 14        # legend colour square
_LEGEND_ROW = 22


def palette(n: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map (bit-interleaved class index), (n, 3) uint8."""
  idx, out = np.arange(n), np.zeros((n, 3), np.int64)
  for j in range(8):
    for c in range(3):
      out[:, c] |= ((idx >> (3 * j + c)) & 1) << (7 - j)
  return out.astype(np.uint8)


def upscale_factor(height: int, width: int, min_panel: int) -> int:
  """The smallest integer factor that makes the shorter side at least ``min_panel``."""
  return max(1, math.ceil(min_panel / max(1, min(height, width))))


def paint(image: np.ndarray, label: np.ndarray, ignore_index: int = 255,
          alpha: float = 1.0) -> np.ndarray:
  """The label map's colours, blended over the image by ``alpha`` (ignored pixels white)."""
  colour = palette()[np.clip(label, 0, 255)].astype(np.float32)
  colour[label == ignore_index] = IGNORE_COLOUR
  return ((1 - alpha) * image.astype(np.float32) + alpha * colour).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:   # Pillow < 10.1 has one fixed-size bitmap font
    return ImageFont.load_default()


def overlay_image(image: np.ndarray, label: np.ndarray, pred: np.ndarray,
                  class_names: Optional[Sequence[str]] = None, ignore_index: int = 255,
                  min_panel: int = 256) -> Image.Image:
  """The three panels, enlarged, with titles and (given ``class_names``) a colour legend."""
  if image.shape[:2] != label.shape or label.shape != pred.shape:
    raise ValueError(f'image {image.shape[:2]}, label {label.shape} and prediction '
                     f'{pred.shape} must have the same height and width')
  k = upscale_factor(*label.shape, min_panel)
  big = lambda a: np.repeat(np.repeat(a, k, axis=0), k, axis=1)
  panels = [big(image), big(paint(image, label, ignore_index)),
            big(paint(image, pred, ignore_index))]
  h, w = panels[0].shape[:2]
  present = sorted(set(np.unique(label).tolist()) | set(np.unique(pred).tolist()))
  present = [c for c in present if c != ignore_index]
  legend_rows = 0
  if class_names is not None:
    per_row = max(1, (3 * w + 2 * _GAP) // 150)
    legend_rows = math.ceil(len(present) / per_row)
  canvas = Image.new('RGB', (3 * w + 2 * _GAP, _TITLE_H + h + legend_rows * _LEGEND_ROW + 6),
                     (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = _font(14)
  for i, (panel, title) in enumerate(zip(panels, ('image', 'ground truth', 'prediction'))):
    x = i * (w + _GAP)
    canvas.paste(Image.fromarray(panel), (x, _TITLE_H))
    draw.text((x + 4, 3), title, fill=(0, 0, 0), font=font)
  if class_names is not None:
    pal = palette()
    for n, c in enumerate(present):
      row, col = divmod(n, per_row)
      x, y = 4 + col * 150, _TITLE_H + h + 4 + row * _LEGEND_ROW
      name = class_names[c] if c < len(class_names) else f'class {c}'
      draw.rectangle([x, y, x + _SWATCH, y + _SWATCH], fill=tuple(int(v) for v in pal[c]),
                     outline=(0, 0, 0))
      draw.text((x + _SWATCH + 5, y), name, fill=(0, 0, 0), font=font)
  return canvas


def save_overlay(path: str, image: np.ndarray, label: np.ndarray, pred: np.ndarray,
                 ignore_index: int = 255, class_names: Optional[Sequence[str]] = None,
                 min_panel: int = 256) -> None:
  """Writes ``overlay_image`` as a PNG."""
  overlay_image(image, label, pred, class_names, ignore_index, min_panel).save(path)
