"""Training-free zero-shot semantic segmentation (the SCLIP protocol, spec 5.4) and mIoU.

Per image: resize and normalise (``seg_datasets``), slide crop x crop windows, score the
teacher's CSA patch tokens (through ``visual.proj``) against the text queries, upsample each
window's logits, average the overlaps, resize to the original size; then softmax, synonym
max, area / probability thresholds, argmax. All steps before the softmax are linear and
separable and the window grid is a product of row and column positions (count map =
count_h(y) * count_w(x)), so the image logits are ``A @ G[q] @ B^T``: G holds the window
logits as blocks, A and B compose upsampling, placement, count division and the final
resize. Same arithmetic as the reference in another order, without full-size canvases.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cosmos_jax.convert import pick_tree
from cosmos_jax.eval.encode import Encoder
from cosmos_jax.eval.seg_datasets import (load_templates, normalize, prefetch, rescale_size,
                                          resize_linear, save_overlay, split_synonyms)
from cosmos_jax.models import CLIP, ModelConfig

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SegConfig:
  """Per-dataset settings (the cfg_*.py files and ``CLIPForSegmentation`` defaults)."""
  name: str
  short_side: int = 336            # Resize(scale=(long_side, short_side), keep_ratio=True)
  long_side: int = 2048
  logit_scale: float = 40.0
  prob_thd: float = 0.0
  area_thd: Optional[float] = None
  reduce_zero_label: bool = False  # label 0 -> ignore, others - 1 (before the metric)
  with_background: bool = False    # class 0 is background (informational; see area_thd)
  crop: int = 224
  stride: int = 112
  csa: bool = True


SEG_CONFIGS = {c.name: c for c in [
    SegConfig('voc20', reduce_zero_label=True),
    SegConfig('voc21', logit_scale=65, prob_thd=0.1, area_thd=0.1, with_background=True),
    SegConfig('context59', reduce_zero_label=True),
    SegConfig('context60', logit_scale=50, prob_thd=0.1, with_background=True),
    SegConfig('ade20k', reduce_zero_label=True),
    SegConfig('cityscapes', short_side=560),
    SegConfig('coco_stuff164k', short_side=448),
    SegConfig('coco_object', logit_scale=50, prob_thd=0.1, with_background=True),
    SegConfig('synthetic', short_side=224, logit_scale=50, prob_thd=0.1, with_background=True),
]}


def select_params(params: Mapping, which: str = 'teacher') -> Mapping:
  """The tree to segment with: a bare tree, {'params': t}, a train state or converted trees."""
  if 'visual' in params:
    return params
  return select_params(pick_tree(dict(params), which), which)


# --- geometry ---


def window_starts(size: int, crop: int, stride: int) -> list[int]:
  """mmseg slide inference along one axis: grid count and border snapping."""
  grids = max(size - crop + stride - 1, 0) // stride + 1
  return [max(min(i * stride + crop, size) - crop, 0) for i in range(grids)]


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
  """(y1, y2, x1, x2) of every window, row-major; a crop larger than the image is clipped."""
  return [(y, min(y + crop, h), x, min(x + crop, w))
          for y in window_starts(h, crop, stride) for x in window_starts(w, crop, stride)]


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of torch ``interpolate(mode='bilinear', align_corners=False)``."""
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size))
  np.add.at(m, (np.arange(out_size), i0), 1 - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m


def axis_operator(out_size: int, size: int, starts: Sequence[int], crop: int,
                  grid: int) -> np.ndarray:
  """(out_size, len(starts) * grid): upsample, place, divide by the count, resize."""
  up = bilinear_matrix(grid, crop)
  m, count = np.zeros((size, len(starts) * grid)), np.zeros(size)
  for i, s in enumerate(starts):
    m[s:s + crop, i * grid:(i + 1) * grid] = up
    count[s:s + crop] += 1
  return bilinear_matrix(size, out_size) @ (m / count[:, None])


def _ceil_to(n: int, k: int) -> int:
  return -(-n // k) * k


def _pad(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  return np.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)])


# --- post-processing ---


def _assemble(grid: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  t = jnp.einsum('qkl,wl->qkw', grid, b, precision=HIGHEST)
  return jnp.einsum('hk,qkw->qhw', a, t, precision=HIGHEST)


def _postprocess(logits: jax.Array, valid: jax.Array, query_idx: jax.Array, scale: Any,
                 prob_thd: Any, area_thd: Any, num_classes: int, use_area: bool) -> jax.Array:
  """(nQ, H, W) logits -> (H, W) int32 classes (``postprocess_result``)."""
  p = jax.nn.softmax(scale * logits, axis=0)
  if logits.shape[0] != num_classes:  # max over each class's synonym queries
    p = jax.ops.segment_max(p, query_idx, num_segments=num_classes, indices_are_sorted=True)
  if use_area:
    area = jnp.bincount(jnp.argmax(p, 0).ravel(), valid.ravel().astype(jnp.float32),
                        length=num_classes)[1:]
    # The reference keeps a class when area > thd * total (strict), else zeroes its prob.
    keep = (area > area_thd * area.sum()).astype(p.dtype)
    p = p.at[1:].multiply(keep[:, None, None])
  pred = jnp.argmax(p, 0)
  return jnp.where(p.max(0) < prob_thd, 0, pred).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('num_classes', 'use_area'))
def _predict(grid, a, b, hw, query_idx, scale, prob_thd, area_thd, *, num_classes, use_area):
  valid = ((jnp.arange(a.shape[0]) < hw[0])[:, None] & (jnp.arange(b.shape[0]) < hw[1])[None])
  return _postprocess(_assemble(grid, a, b), valid, query_idx, scale, prob_thd, area_thd,
                      num_classes, use_area)


def postprocess(logits: np.ndarray, query_idx: Sequence[int], logit_scale: float = 40.0,
                prob_thd: float = 0.0, area_thd: Optional[float] = None) -> np.ndarray:
  """Softmax, synonym max, area / probability thresholds and argmax of (nQ, H, W) logits."""
  num_classes = int(max(query_idx)) + 1
  valid = jnp.ones(logits.shape[1:], bool)
  out = _postprocess(jnp.asarray(logits, jnp.float32), valid, jnp.asarray(query_idx), logit_scale,
                     prob_thd, area_thd or 0.0, num_classes, area_thd is not None)
  return np.asarray(out)


# --- the segmentor ---


@dataclasses.dataclass
class Prepared:
  """Host-side inputs of one image: window crops and the two axis operators."""
  crops: np.ndarray    # (n, ch, cw, 3) float32
  a: np.ndarray        # (H0, nh * gh)
  b: np.ndarray        # (W0, nw * gw)
  windows: tuple[int, int]
  grid: tuple[int, int]


class Segmentor:
  """Zero-shot segmentation of uint8 RGB images with text queries from class lines."""

  def __init__(self, model_config: ModelConfig, params: Mapping, class_lines: Sequence[str],
               seg_config: SegConfig, templates: Optional[Sequence[str]] = None, *,
               which: str = 'teacher', dtype: Any = jnp.float32, max_windows: int = 64,
               text_batch: int = 256, pixel_bucket: int = 64, mesh: Optional[Mesh] = None):
    # With a mesh, the windows of an image are split over ('data', 'fsdp'); buckets are
    # multiples of 8 and of that data-parallel size.
    self._crop_sharding, self._multiple = None, 8
    if mesh is not None:
      axes = tuple(a for a in ('data', 'fsdp') if a in mesh.shape)
      self._crop_sharding = NamedSharding(mesh, P(axes))
      self._multiple = math.lcm(8, math.prod(mesh.shape[a] for a in axes))
      params = jax.device_put(select_params(params, which), NamedSharding(mesh, P()))
    else:
      params = jax.device_put(select_params(params, which))
    self.seg = seg_config
    self.patch = model_config.vision.patch_size
    self.max_windows = max(self._multiple, _ceil_to(max_windows, self._multiple))
    self.pixel_bucket = pixel_bucket
    self.class_lines = list(class_lines)
    words, idx = split_synonyms(self.class_lines)
    self.num_classes, self.query_idx = len(self.class_lines), jnp.asarray(idx, jnp.int32)
    templates = load_templates() if templates is None else list(templates)
    encoder = Encoder(model_config, params, dtype=dtype, batch_size=text_batch, progress=False,
                      mesh=mesh)
    self.queries = jnp.asarray(encoder.class_embeddings(words, templates))
    self.params = params
    model, csa = CLIP(model_config, dtype=dtype), seg_config.csa

    def window_logits(p, crops, queries):
      _, aux = model.apply({'params': p}, crops, normalize=False, csa=csa,
                           method=CLIP.encode_image)
      feats = jnp.einsum('nld,de->nle', aux['tokens'].astype(jnp.float32),
                         p['visual']['proj'].astype(jnp.float32), precision=HIGHEST)
      feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
      logits = jnp.einsum('nle,qe->nql', feats, queries, precision=HIGHEST)
      return logits.reshape(logits.shape[:2] + aux['grid'])  # row-major patch order

    self._window_logits = jax.jit(window_logits)
    self._assemble = jax.jit(_assemble)

  def prepare(self, image: np.ndarray) -> Prepared:
    """Resize, normalise and cut windows (host side, thread-safe)."""
    s = self.seg
    h0, w0 = image.shape[:2]
    h, w = rescale_size(h0, w0, s.short_side, s.long_side)
    x = normalize(resize_linear(image, (h, w)))
    ys, xs = window_starts(h, s.crop, s.stride), window_starts(w, s.crop, s.stride)
    ch, cw = min(s.crop, h), min(s.crop, w)  # a side smaller than the crop is taken whole
    gh, gw = ch // self.patch, cw // self.patch  # the patch conv drops the remainder
    if gh == 0 or gw == 0:
      raise ValueError(f'resized image {h}x{w} is smaller than one {self.patch}px patch')
    crops = np.stack([x[y:y + ch, c:c + cw] for y in ys for c in xs])
    return Prepared(crops, axis_operator(h0, h, ys, ch, gh), axis_operator(w0, w, xs, cw, gw),
                    (len(ys), len(xs)), (gh, gw))

  def _grid(self, prep: Prepared) -> np.ndarray:
    """Window logits (n, nQ, gh, gw) -> blocks (nQ, nh * gh, nw * gw)."""
    n, out = len(prep.crops), []
    chunk = min(self.max_windows, _ceil_to(n, self._multiple))  # one compile per bucket
    for s in range(0, n, chunk):
      part = prep.crops[s:s + chunk]
      crops = _pad(part, (chunk,) + part.shape[1:])
      if self._crop_sharding is not None:
        crops = jax.device_put(crops, self._crop_sharding)
      logits = self._window_logits(self.params, crops, self.queries)
      out.append(np.asarray(logits)[:len(part)])
    (nh, nw), (gh, gw) = prep.windows, prep.grid
    logits = np.concatenate(out).reshape(nh, nw, -1, gh, gw)
    return logits.transpose(2, 0, 3, 1, 4).reshape(-1, nh * gh, nw * gw)

  def _padded(self, prep: Prepared) -> tuple[np.ndarray, ...]:
    grid = self._grid(prep)
    kh, kw = _ceil_to(grid.shape[1], 16), _ceil_to(grid.shape[2], 16)
    hb, wb = (_ceil_to(n, self.pixel_bucket) for n in (prep.a.shape[0], prep.b.shape[0]))
    return (_pad(grid, (grid.shape[0], kh, kw)), _pad(prep.a, (hb, kh)).astype(np.float32),
            _pad(prep.b, (wb, kw)).astype(np.float32))

  def logits(self, image: np.ndarray | Prepared) -> np.ndarray:
    """(nQ, H0, W0) query logits at the original size, before the softmax."""
    prep = image if isinstance(image, Prepared) else self.prepare(image)
    out = self._assemble(*self._padded(prep))
    return np.asarray(out)[:, :prep.a.shape[0], :prep.b.shape[0]]

  def predict(self, image: np.ndarray | Prepared) -> np.ndarray:
    """(H0, W0) int32 class map."""
    prep = image if isinstance(image, Prepared) else self.prepare(image)
    s, (h0, w0) = self.seg, (prep.a.shape[0], prep.b.shape[0])
    pred = _predict(*self._padded(prep), np.array([h0, w0], np.int32), self.query_idx,
                    np.float32(s.logit_scale), np.float32(s.prob_thd),
                    np.float32(s.area_thd or 0.0), num_classes=self.num_classes,
                    use_area=s.area_thd is not None)
    return np.asarray(pred)[:h0, :w0]


# --- metric ---


def reduce_labels(label: np.ndarray) -> np.ndarray:
  """mmseg: 0 -> 255 (ignored), every other label - 1 (255 stays 255)."""
  label = label.astype(np.int64) - 1
  return np.where((label < 0) | (label == 254), 255, label)


class IoUAccumulator:
  """mmseg ``IoUMetric``: per-class intersection / union summed over the whole dataset."""

  def __init__(self, num_classes: int, ignore_index: int = 255):
    self.num_classes, self.ignore_index = num_classes, ignore_index
    self.inter, self.pred, self.label = (np.zeros(num_classes, np.int64) for _ in range(3))

  def update(self, pred: np.ndarray, label: np.ndarray) -> None:
    if pred.shape != label.shape:
      raise ValueError(f'prediction {pred.shape} and label {label.shape} differ in shape')
    keep = label != self.ignore_index
    p, g = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    count = lambda v: np.bincount(v[(v >= 0) & (v < self.num_classes)],
                                  minlength=self.num_classes)  # histc drops out-of-range
    self.inter += count(p[p == g])
    self.pred += count(p)
    self.label += count(g)

  def compute(self) -> dict[str, Any]:
    """Percentages: mIoU / mAcc over classes seen in GT or prediction, aAcc, per-class IoU."""
    union = self.pred + self.label - self.inter
    with np.errstate(divide='ignore', invalid='ignore'):
      iou = self.inter / union
      acc = self.inter / self.label
    nanmean = lambda v: float(np.nanmean(v)) * 100 if np.isfinite(v).any() else math.nan
    return {'mIoU': nanmean(iou), 'mAcc': nanmean(acc),
            'aAcc': float(self.inter.sum() / max(self.label.sum(), 1)) * 100,
            'IoU': [float(v) * 100 for v in iou]}


def miou(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], num_classes: int,
         ignore_index: int = 255, reduce_zero_label: bool = False) -> dict[str, Any]:
  """Dataset-level mIoU of predictions against label maps (see ``IoUAccumulator``)."""
  acc = IoUAccumulator(num_classes, ignore_index)
  for p, g in zip(preds, gts, strict=True):
    acc.update(np.asarray(p), reduce_labels(g) if reduce_zero_label else g)
  return acc.compute()


# --- the evaluation loop ---


def evaluate_segmentation(model_config: ModelConfig, params: Mapping, dataset: Any,
                          seg_config: SegConfig | str | None = None,
                          templates: Optional[Sequence[str]] = None, *, progress: bool = True,
                          overlay_dir: Optional[str] = None, num_overlays: int = 4,
                          which: str = 'teacher', dtype: Any = jnp.float32,
                          max_images: Optional[int] = None, workers: int = 4,
                          max_windows: int = 64, mesh: Optional[Mesh] = None) -> dict[str, Any]:
  """mIoU (percent) of zero-shot segmentation on ``dataset`` (items (key, image, label)).

  ``seg_config`` defaults to ``SEG_CONFIGS[dataset.name]``; ``templates`` to the 80 OpenAI
  templates. With ``overlay_dir``, the first ``num_overlays`` images are drawn there.
  """
  if seg_config is None or isinstance(seg_config, str):
    seg_config = SEG_CONFIGS[seg_config or dataset.name]
  class_lines = dataset.class_lines()
  seg = Segmentor(model_config, params, class_lines, seg_config, templates, which=which,
                  dtype=dtype, max_windows=max_windows, mesh=mesh)
  n = len(dataset) if max_images is None else min(max_images, len(dataset))
  acc = IoUAccumulator(len(class_lines))
  if overlay_dir:
    os.makedirs(overlay_dir, exist_ok=True)
  legend_names = [line.split(', ')[0].strip() for line in class_lines]
  if seg_config.with_background:  # VOC21 / COCO-Object line 0 lists background words
    legend_names[0] = 'background'

  def load(i):
    key, image, label = dataset[i]
    return key, image, label, seg.prepare(image)

  bar = tqdm(total=n, desc=f'seg {getattr(dataset, "name", "")}', disable=not progress)
  for i, (key, image, label, prep) in enumerate(prefetch(load, n, workers)):
    pred = seg.predict(prep)
    if seg_config.reduce_zero_label:
      label = reduce_labels(label)
    acc.update(pred, label)
    if overlay_dir and i < num_overlays:
      name = str(key).replace(os.sep, '_').replace('/', '_')
      save_overlay(os.path.join(overlay_dir, f'{name}.png'), image, label, pred,
                   class_names=legend_names)
    bar.update(1)
  bar.close()
  result = acc.compute()
  result['IoU'] = dict(zip(legend_names, result['IoU']))
  result.update(dataset=getattr(dataset, 'name', seg_config.name), num_images=n)
  return result
