"""Segmentation benchmarks without mmsegmentation: folder readers and the test pipeline (5.4).

Each reader finds the files the way the mmseg / SCLIP configs do and yields
``(key, image uint8 (H, W, 3) RGB, label uint8 (H, W))`` with the label exactly as stored
(``reduce_zero_label`` is applied by the evaluation, see ``SegConfig``). Every dataset knows
its class-name file under ``prompts/seg/`` (one class per line, ', '-separated synonyms).

The test pipeline (``LoadImageFromFile`` + ``Resize(scale=(2048, S), keep_ratio=True)`` +
``SegDataPreProcessor``) is here too: ``rescale_size`` is mmcv's size rule and
``resize_linear`` re-implements OpenCV's fixed-point ``INTER_LINEAR`` for uint8 images.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
from PIL import Image

from cosmos_jax.eval.overlays import palette, save_overlay  # noqa: F401  (re-exported)

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prompts', 'seg')
TEMPLATE_FILE = os.path.join(os.path.dirname(PROMPT_DIR), 'openai_templates.txt')
# SegDataPreProcessor statistics (clip_segmentor.py), RGB order, 0-255 scale.
SEG_MEAN = np.array([122.771, 116.746, 104.094], np.float32)
SEG_STD = np.array([68.501, 66.632, 70.323], np.float32)
Item = tuple[str, np.ndarray, np.ndarray]

# --- the test pipeline ---


def rescale_size(h: int, w: int, short_side: int, long_side: int = 2048) -> tuple[int, int]:
  """mmcv ``rescale_size``: factor = min(long/max(h, w), short/min(h, w)), int(d * f + 0.5)."""
  factor = min(long_side / max(h, w), short_side / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def _linear_taps(in_size: int, out_size: int, clamp: bool) -> tuple[np.ndarray, ...]:
  """OpenCV's source index and 11-bit fixed-point weights per output index."""
  scale = 1.0 / (out_size / in_size)  # double, as cv::resize computes it
  f = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
  s = np.floor(f).astype(np.int64)
  f = (f - s.astype(np.float32)).astype(np.float32)
  if clamp:  # columns only; OpenCV leaves rows unclamped and clips the row index instead
    low, high = s < 0, s >= in_size - 1
    f[low | high] = 0
    s = np.where(low, 0, np.where(high, in_size - 1, s))
  w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int32)
  w1 = np.rint(f * np.float32(2048)).astype(np.int32)
  return np.clip(s, 0, in_size - 1), np.clip(s + 1, 0, in_size - 1), w0, w1


def resize_linear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """``cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`` for uint8 images.

  The generic fixed-point path of OpenCV (HResizeLinear + VResizeLinear<uchar>): half-pixel
  centres, no antialiasing, weights rounded to 1/2048, and the vertical pass
  ``(((b0 * (r0 >> 4)) >> 16) + ((b1 * (r1 >> 4)) >> 16) + 2) >> 2``. An exact 2x shrink,
  which OpenCV routes to INTER_AREA, gives the same numbers. PIL's BILINEAR, which
  antialiases when shrinking, is not a substitute: on a 600x512 photo resized to 394x336 it
  differs by 1.6 grey levels on average (max 59); this function differs from exact
  float bilinear by < 1.
  """
  h, w = size
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f'resize_linear needs a uint8 (H, W[, C]) image, got {image.dtype} '
                     f'{image.shape}')
  if (h, w) == image.shape[:2]:
    return image.copy()
  x0, x1, a0, a1 = _linear_taps(image.shape[1], w, clamp=True)
  y0, y1, b0, b1 = _linear_taps(image.shape[0], h, clamp=False)
  if image.ndim == 3:
    a0, a1, b0, b1 = a0[:, None], a1[:, None], b0[:, None, None], b1[:, None, None]
  else:
    b0, b1 = b0[:, None], b1[:, None]
  src = image.astype(np.int32)
  rows = src[:, x0] * a0 + src[:, x1] * a1  # (H, w[, C]) int, values * 2048
  out = (((b0 * (rows[y0] >> 4)) >> 16) + ((b1 * (rows[y1] >> 4)) >> 16) + 2) >> 2
  return np.clip(out, 0, 255).astype(np.uint8)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 RGB -> float32 (x - mean) / std with the SegDataPreProcessor statistics."""
  return (image.astype(np.float32) - SEG_MEAN) / SEG_STD


# --- drawing: palette and save_overlay live in overlays.py, re-exported here ---


# --- class-name files ---


def read_class_lines(name_or_path: str) -> list[str]:
  """Lines of a class-name file (a path, or a file name under ``prompts/seg/``)."""
  path = name_or_path if os.path.sep in name_or_path else os.path.join(PROMPT_DIR, name_or_path)
  with open(path, encoding='utf-8') as f:
    return [line.replace('\n', '') for line in f.readlines()]


def split_synonyms(class_lines: Sequence[str]) -> tuple[list[str], list[int]]:
  """Query words and their class index: each ', '-separated synonym is its own query."""
  words, index = [], []
  for c, line in enumerate(class_lines):
    names = line.split(', ')
    words += names
    index += [c] * len(names)
  return words, index


def load_templates(path: str = TEMPLATE_FILE) -> list[str]:
  """The 80 OpenAI ImageNet templates (``{}`` = the class name), one a line."""
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f if line.strip()]


# --- readers ---


def load_rgb(path: str) -> np.ndarray:
  """RGB uint8 as stored; unlike cv2.imread, EXIF orientation is not applied."""
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def load_label(path: str) -> np.ndarray:
  """A label map as stored (palette PNGs give their indices), cast to uint8 like mmseg."""
  with Image.open(path) as im:
    label = np.asarray(im)
  if label.ndim != 2:
    raise ValueError(f'label map {path} has shape {label.shape}; expected one channel')
  return label.astype(np.uint8)


class SegDataset(Sequence):
  """``(key, image, label)`` items of one benchmark split, read lazily from files."""

  def __init__(self, name: str, class_file: str, items: Sequence[tuple[str, str, str]]):
    self.name, self.class_file, self.items = name, class_file, list(items)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i: int) -> Item:
    key, image_path, label_path = self.items[i]
    image, label = load_rgb(image_path), load_label(label_path)
    if image.shape[:2] != label.shape:
      raise ValueError(f'image {image_path} is {image.shape[:2]} but its label {label_path} '
                       f'is {label.shape}')
    return key, image, label

  def __iter__(self) -> Iterator[Item]:
    return (self[i] for i in range(len(self)))

  def class_lines(self) -> list[str]:
    return read_class_lines(self.class_file)


def _require(path: str, what: str, kind: str = 'folder') -> str:
  ok = os.path.isdir(path) if kind == 'folder' else os.path.isfile(path)
  if not ok:
    raise FileNotFoundError(f'{what}: {kind} {path} does not exist')
  return path


def _with_masks(items: list[tuple[str, str, str]], what: str) -> list[tuple[str, str, str]]:
  for _, image_path, label_path in items:
    if not os.path.isfile(image_path):
      raise FileNotFoundError(f'{what}: image {image_path} does not exist')
    if not os.path.isfile(label_path):
      raise FileNotFoundError(f'{what}: image {image_path} has no mask {label_path}')
  if not items:
    raise FileNotFoundError(f'{what}: no images found')
  return items


def _from_split(root: str, split_file: str, image_dir: str, label_dir: str, what: str,
                image_suffix: str = '.jpg', label_suffix: str = '.png') -> list:
  """Items named by an ``ImageSets`` split file (VOC / Context)."""
  _require(root, what)
  image_dir = _require(os.path.join(root, image_dir), what)
  label_dir = _require(os.path.join(root, label_dir), what)
  with open(_require(os.path.join(root, split_file), what, 'file')) as f:
    ids = [line.strip() for line in f if line.strip()]
  return _with_masks([(i, os.path.join(image_dir, i + image_suffix),
                       os.path.join(label_dir, i + label_suffix)) for i in ids], what)


def _from_listing(root: str, image_dir: str, label_dir: str, what: str, image_suffix: str,
                  label_suffix: str) -> list:
  """Every ``*image_suffix`` file under image_dir (recursive, sorted), mask at the same path."""
  _require(root, what)
  image_dir = _require(os.path.join(root, image_dir), what)
  label_dir = _require(os.path.join(root, label_dir), what)
  items = []
  for folder, _, files in os.walk(image_dir):
    for name in files:
      if name.endswith(image_suffix):
        rel = os.path.relpath(os.path.join(folder, name), image_dir)[:-len(image_suffix)]
        items.append((rel, os.path.join(image_dir, rel + image_suffix),
                      os.path.join(label_dir, rel + label_suffix)))
  return _with_masks(sorted(items, key=lambda t: t[1]), what)


def voc(root: str, with_background: bool = True) -> SegDataset:
  """PASCAL VOC 2012 val (root = VOCdevkit/VOC2012): VOC21, or VOC20 without background."""
  name = 'voc21' if with_background else 'voc20'
  items = _from_split(root, 'ImageSets/Segmentation/val.txt', 'JPEGImages', 'SegmentationClass',
                      name)
  return SegDataset(name, f'cls_{name}.txt', items)


def context(root: str, with_background: bool = True) -> SegDataset:
  """PASCAL Context val (root = VOCdevkit/VOC2010): Context60, or Context59 without it."""
  name = 'context60' if with_background else 'context59'
  items = _from_split(root, 'ImageSets/SegmentationContext/val.txt', 'JPEGImages',
                      'SegmentationClassContext', name)
  return SegDataset(name, f'cls_{name}.txt', items)


def ade20k(root: str) -> SegDataset:
  """ADE20K val (root = ADEChallengeData2016)."""
  items = _from_listing(root, 'images/validation', 'annotations/validation', 'ade20k', '.jpg',
                        '.png')
  return SegDataset('ade20k', 'cls_ade20k.txt', items)


def cityscapes(root: str) -> SegDataset:
  """Cityscapes val with ``*_gtFine_labelTrainIds.png`` (made by convert_cityscapes.py)."""
  items = _from_listing(root, 'leftImg8bit/val', 'gtFine/val', 'cityscapes', '_leftImg8bit.png',
                        '_gtFine_labelTrainIds.png')
  return SegDataset('cityscapes', 'cls_city_scapes.txt', items)


def coco_stuff(root: str) -> SegDataset:
  """COCO-Stuff 164k val (root = coco_stuff164k, masks ``*_labelTrainIds.png``)."""
  items = _from_listing(root, 'images/val2017', 'annotations/val2017', 'coco_stuff164k', '.jpg',
                        '_labelTrainIds.png')
  return SegDataset('coco_stuff164k', 'cls_coco_stuff.txt', items)


def coco_object(root: str) -> SegDataset:
  """COCO-Object val (masks ``*_instanceTrainIds.png`` from convert_coco_object.py)."""
  items = _from_listing(root, 'images/val2017', 'annotations/val2017', 'coco_object', '.jpg',
                        '_instanceTrainIds.png')
  return SegDataset('coco_object', 'cls_coco_object.txt', items)


class SyntheticSeg(Sequence):
  """The synthetic val split as a segmentation set: 0 = background, k = shape k - 1."""
  name = 'synthetic'

  def __init__(self, data: Any, limit: Optional[int] = None):
    from cosmos_jax.data.synthetic import SyntheticConfig, SyntheticDataset
    if isinstance(data, SyntheticConfig):
      data = SyntheticDataset(data, split='val')
    self.data = data
    self.size = len(data) if limit is None else min(limit, len(data))

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> Item:
    if not 0 <= i < self.size:
      raise IndexError(i)
    item = self.data[i]
    return item['key'], item['image'], item['mask']

  def __iter__(self) -> Iterator[Item]:
    return (self[i] for i in range(len(self)))

  def class_lines(self) -> list[str]:
    return list(self.data.mask_class_names())


def prefetch(fn: Callable[[int], Any], n: int, workers: int) -> Iterator[Any]:
  """fn(0), ..., fn(n - 1) in order, computed by a thread pool a few items ahead."""
  if workers <= 0:
    yield from (fn(i) for i in range(n))
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for i in range(n):
      pending.append(pool.submit(fn, i))
      if len(pending) > 2 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


READERS = {
    'voc20': functools.partial(voc, with_background=False),
    'voc21': functools.partial(voc, with_background=True),
    'context59': functools.partial(context, with_background=False),
    'context60': functools.partial(context, with_background=True),
    'ade20k': ade20k,
    'cityscapes': cityscapes,
    'coco_stuff164k': coco_stuff,
    'coco_object': coco_object,
}


def get_dataset(name: str, root: str) -> SegDataset:
  """A benchmark by its ``SEG_CONFIGS`` name, read from ``root`` (the mmseg data_root)."""
  if name not in READERS:
    raise ValueError(f'unknown segmentation dataset {name!r}; known: {sorted(READERS)}')
  return READERS[name](root)
