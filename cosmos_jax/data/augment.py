"""Image transforms: COSMOS/DINO multi-crop (spec 2.3), the evaluation transform, CLIP
normalisation.

``multi_crop`` returns uint8 crops; CLIP mean/std normalisation happens later, on device,
with ``normalize`` (it accepts numpy and jax arrays), so host->device traffic and host
memory per batch are 4x smaller than shipping float32.

Each view runs, in the official order: RandomResizedCrop (PIL bicubic) -> horizontal flip
-> colour jitter (brightness, contrast, saturation, hue in a random order) -> grayscale
-> Gaussian blur -> solarize (second global view only). The colour, blur and solarize ops
call the same PIL operations as torchvision's PIL backend, so for equal factors the pixels
are identical.

Deviations from torchvision / the official code:
  * Randomness comes from one ``np.random.Generator``; the official code mixes torch's RNG
    (crop, flip, jitter factors and order) and Python's ``random`` (the jitter, grayscale,
    blur and solarize gates, the blur radius). Same distributions, different draws.
  * Crop scale and log-ratio are drawn in float64 (torch draws them in float32), so a box
    whose side sits on a rounding boundary can differ by one pixel for the same draw.
  * A step whose probability is 0 draws nothing (the official global-1 and local views
    have no solarize step at all, so this matches them; a zero flip/jitter/grayscale
    probability would still draw there).
  * The image is converted to RGB once, before cropping (the official code converts after
    the crop). Identical for the RGB images the loader decodes; for palette/alpha images
    the resize sees the converted pixels.
  * Views beyond the second global one reuse the second's blur/solarize probabilities (the
    official code asserts exactly 2 global views).
Not deviations: the hue shift is torchvision's (PIL HSV, hue channel + trunc(h * 255) mod
256); the crop is cut out first and then resized (PIL ``resize(box=...)`` would filter
across the box edge and differ); the blur gate is ``u <= p`` as in the official code.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# OpenAI CLIP statistics (open_clip constants), RGB in [0, 1].
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

_RESAMPLE = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'lanczos': Image.Resampling.LANCZOS,
}


def normalize(image):
  """uint8 (..., H, W, 3) RGB -> float32 CLIP-normalised.

  Works on numpy and on jax arrays (also inside ``jit``): the arithmetic is the same
  float32 (x / 255 - mean) / std as torchvision's ToTensor + Normalize.
  """
  return ((image.astype(np.float32) / np.float32(255.0)) - CLIP_MEAN) / CLIP_STD


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


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
  """Every number of the official multi-crop (``--crop-scale 0.4``, 6 local crops).

  ``blur_p`` and ``solarize_p`` are per view kind: (global 1, global 2, locals).
  """
  global_size: int = 224
  local_size: int = 96
  num_global: int = 2
  num_local: int = 6
  global_scale: tuple[float, float] = (0.4, 1.0)
  local_scale: tuple[float, float] = (0.05, 0.4)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_p: float = 0.5
  jitter_p: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_p: float = 0.2
  blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
  blur_radius: tuple[float, float] = (0.1, 2.0)
  solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)
  solarize_threshold: int = 128
  interpolation: str = 'bicubic'

  def __post_init__(self):
    if self.interpolation not in _RESAMPLE:
      raise ValueError(f'interpolation {self.interpolation!r} not in {sorted(_RESAMPLE)}')
    if self.num_global < 1 or self.num_local < 0:
      raise ValueError(f'bad crop counts {self.num_global}, {self.num_local}')
    if len(self.blur_p) != 3 or len(self.solarize_p) != 3:
      raise ValueError('blur_p and solarize_p need 3 entries: (global1, global2, locals)')
    if not 0 <= self.hue <= 0.5:
      raise ValueError(f'hue must be in [0, 0.5], got {self.hue}')


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(left, top, w, h) by torchvision's RandomResizedCrop.get_params algorithm.

  Up to 10 tries of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio);
  otherwise the whole image, centre-cropped to the nearest allowed aspect ratio.
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int,
                 interpolation: str = 'bicubic') -> Image.Image:
  """Cut ``box`` = (left, top, w, h) out, then resize it to size x size."""
  left, top, w, h = box
  return image.crop((left, top, left + w, top + h)).resize((size, size),
                                                          _RESAMPLE[interpolation])


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Brightness(image).enhance(factor)


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Contrast(image).enhance(factor)


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Color(image).enhance(factor)


def adjust_hue(image: Image.Image, factor: float) -> Image.Image:
  """Rotates the PIL HSV hue channel by trunc(factor * 255), wrapping at 256."""
  if not -0.5 <= factor <= 0.5:
    raise ValueError(f'hue factor {factor} not in [-0.5, 0.5]')
  hsv = np.array(image.convert('HSV'))
  hsv[..., 0] += np.uint8(int(factor * 255) % 256)   # uint8 arithmetic wraps at 256
  return Image.fromarray(hsv, 'HSV').convert(image.mode)


def to_grayscale(image: Image.Image) -> Image.Image:
  """3-channel gray from PIL's 'L' conversion (ITU-R 601-2 luma)."""
  return image.convert('L').convert('RGB')


def solarize(image: Image.Image, threshold: int = 128) -> Image.Image:
  return ImageOps.solarize(image, threshold)


def gaussian_blur(image: Image.Image, radius: float) -> Image.Image:
  return image.filter(ImageFilter.GaussianBlur(radius=radius))


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(image: Image.Image, rng: np.random.Generator,
                 cfg: MultiCropConfig) -> Image.Image:
  """torchvision ColorJitter: a random op order, then one factor per enabled op."""
  order = rng.permutation(4)
  factors = []
  for strength in (cfg.brightness, cfg.contrast, cfg.saturation):
    factors.append(rng.uniform(max(0.0, 1 - strength), 1 + strength) if strength else None)
  factors.append(rng.uniform(-cfg.hue, cfg.hue) if cfg.hue else None)
  for i in order:
    if factors[i] is not None:
      image = _ADJUST[i](image, float(factors[i]))
  return image


def _view(image: Image.Image, rng: np.random.Generator, cfg: MultiCropConfig, size: int,
          scale: tuple[float, float], blur_p: float, solarize_p: float) -> np.ndarray:
  box = random_resized_crop_box(image.width, image.height, scale, cfg.ratio, rng)
  view = resized_crop(image, box, size, cfg.interpolation)
  if cfg.flip_p and rng.random() < cfg.flip_p:
    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if cfg.jitter_p and rng.random() < cfg.jitter_p:
    view = color_jitter(view, rng, cfg)
  if cfg.grayscale_p and rng.random() < cfg.grayscale_p:
    view = to_grayscale(view)
  if blur_p and rng.random() <= blur_p:  # '<=' as the official GaussianBlur
    view = gaussian_blur(view, float(rng.uniform(*cfg.blur_radius)))
  if solarize_p and rng.random() < solarize_p:
    view = solarize(view, cfg.solarize_threshold)
  return np.asarray(view, dtype=np.uint8)


def multi_crop(image: Image.Image, rng: np.random.Generator,
               cfg: MultiCropConfig = MultiCropConfig()) -> tuple[np.ndarray, np.ndarray]:
  """Global crops (num_global, G, G, 3) and local crops (num_local, L, L, 3), uint8.

  Views are drawn global 1, global 2, then the locals, as the official code does.
  """
  image = image.convert('RGB')
  glob = [_view(image, rng, cfg, cfg.global_size, cfg.global_scale,
                cfg.blur_p[min(i, 1)], cfg.solarize_p[min(i, 1)])
          for i in range(cfg.num_global)]
  local = [_view(image, rng, cfg, cfg.local_size, cfg.local_scale, cfg.blur_p[2],
                 cfg.solarize_p[2]) for _ in range(cfg.num_local)]
  empty = np.zeros((0, cfg.local_size, cfg.local_size, 3), np.uint8)
  return np.stack(glob), (np.stack(local) if local else empty)
