"""Image transforms. CLIP normalisation constants and the evaluation transform."""

from __future__ import annotations

import numpy as np
from PIL import Image

# OpenAI CLIP statistics (open_clip constants), RGB in [0, 1].
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 (..., H, W, 3) RGB -> float32 CLIP-normalised."""
  return ((image.astype(np.float32) / 255.0) - CLIP_MEAN) / CLIP_STD


def eval_transform(image: Image.Image, size: int = 224) -> np.ndarray:
  """Short side to ``size`` (PIL bicubic), centre crop, normalise: (size, size, 3) float32.

  As torchvision's Resize(size, BICUBIC) + CenterCrop(size) on a PIL image: the long side
  is scaled to int(size * long / short) and the crop offset is rounded like torchvision.
  """
  image = image.convert('RGB')
  w, h = image.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  image = image.resize((new_w, new_h), Image.BICUBIC)
  left = int(round((new_w - size) / 2.0))
  top = int(round((new_h - size) / 2.0))
  image = image.crop((left, top, left + size, top + size))
  return normalize(np.asarray(image))
