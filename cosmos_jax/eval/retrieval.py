"""Zero-shot image-text retrieval (spec 5.2): datasets, similarity and the reference's metrics.

Ranks follow ``compute_retrieval`` of the official ``train.py``: an image's rank is the best
rank of any of its captions, a caption's rank is that of its one image; R@K counts 0-based
ranks < K; mean rank = mean + 1 and median rank = floor(median) + 1 of the 0-based ranks.
R@K are reported in percent. Ties are broken by index (a stable descending sort).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cosmos_jax.data.synthetic import SyntheticConfig, SyntheticDataset
from cosmos_jax.eval.encode import Encoder
from cosmos_jax.eval.report import retrieval_grid_png

KS = (1, 5, 10)
COCO_SPLITS = ('val',)
FLICKR_SPLITS = ('val', 'test')


@dataclasses.dataclass
class RetrievalDataset:
  """Images (paths or uint8 arrays), all captions, and the image index of each caption."""
  name: str
  images: Sequence[Any]
  captions: list[str]
  txt_to_img: np.ndarray

  def __post_init__(self):
    self.txt_to_img = np.asarray(self.txt_to_img, np.int64)
    if len(self.captions) != len(self.txt_to_img):
      raise ValueError(f'{self.name}: {len(self.captions)} captions but {len(self.txt_to_img)} '
                       'caption-to-image indices')


def _ranks_against(scores: np.ndarray, target: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """0-based rank of column target[r] in each row r under a stable descending sort."""
  n = scores.shape[0]
  ranks = np.empty(n, np.int64)
  for s in range(0, n, chunk):
    rows = scores[s:s + chunk]
    tgt = target[s:s + chunk]
    v = rows[np.arange(len(rows)), tgt][:, None]
    before = np.arange(rows.shape[1])[None, :] < tgt[:, None]
    ranks[s:s + chunk] = (rows > v).sum(1) + ((rows == v) & before).sum(1)
  return ranks


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
  out = {f'{prefix}_R@{k}': 100.0 * float(np.mean(ranks < k)) for k in KS}
  out[f'{prefix}_mean_rank'] = float(ranks.mean()) + 1
  out[f'{prefix}_median_rank'] = float(np.floor(np.median(ranks))) + 1
  return out


def retrieval_ranks(sim: np.ndarray, txt_to_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(i2t ranks (n_img,), t2i ranks (n_txt,)), 0-based."""
  sim = np.asarray(sim)
  txt_to_img = np.asarray(txt_to_img, np.int64)
  n_img, n_txt = sim.shape
  if txt_to_img.shape != (n_txt,):
    raise ValueError(f'txt_to_img must have shape ({n_txt},), got {txt_to_img.shape}')
  if n_txt and (txt_to_img.min() < 0 or txt_to_img.max() >= n_img):
    raise ValueError(f'txt_to_img has image indices outside [0, {n_img})')
  missing = np.setdiff1d(np.arange(n_img), txt_to_img)
  if missing.size:
    raise ValueError(f'{missing.size} image(s) have no caption, e.g. image {int(missing[0])}')
  # An image's best-ranked caption is its highest-scoring one (the first among equals).
  own = sim[txt_to_img, np.arange(n_txt)]
  order = np.lexsort((np.arange(n_txt), -own, txt_to_img))
  first = np.r_[True, np.diff(txt_to_img[order]) != 0]
  best = order[first]
  return _ranks_against(sim, best), _ranks_against(sim.T, txt_to_img)


def retrieval_metrics(sim: np.ndarray, txt_to_img: np.ndarray) -> dict[str, float]:
  """i2t / t2i R@1/5/10 (percent), mean and median rank from an (n_img, n_txt) similarity."""
  i2t, t2i = retrieval_ranks(sim, txt_to_img)
  return {**_summary(i2t, 'i2t'), **_summary(t2i, 't2i')}


def similarity(encoder: Encoder, dataset: RetrievalDataset) -> np.ndarray:
  """(n_img, n_txt) cosine similarities (the logit scale does not change ranks)."""
  text = encoder.strings(dataset.captions)
  image = encoder.image_files(dataset.images)
  return image @ text.T


def evaluate_retrieval(encoder: Encoder, dataset: RetrievalDataset,
                       grid_path: str | None = None) -> dict[str, float]:
  """Metrics; with ``grid_path``, also a PNG of the top images of a few caption queries."""
  sim = similarity(encoder, dataset)
  if grid_path:
    retrieval_grid_png(dataset.images, dataset.captions, sim, grid_path,
                       txt_to_img=dataset.txt_to_img)
  return {**retrieval_metrics(sim, dataset.txt_to_img),
          'num_images': len(dataset.images), 'num_captions': len(dataset.captions)}


# --- readers ---

def _first_existing(candidates: Sequence[str], what: str) -> str:
  for c in candidates:
    if os.path.exists(c):
      return c
  raise FileNotFoundError(f'{what} not found; looked for: ' + ', '.join(candidates))


def _check_files(paths: Sequence[str], name: str) -> None:
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'{name}: {len(missing)} listed image(s) are missing, first: '
                            f'{missing[0]}')


def _load_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None


def coco(root: str, split: str = 'val') -> RetrievalDataset:
  """COCO captions val2017 as the reference (5,000 images, 25,014 captions; not Karpathy).

  Reads ``annotations/captions_val2017.json`` (or ``captions_val2017.json``) and images from
  ``images/val2017`` (the reference's layout) or ``val2017``. Captions keep the json order;
  images are in order of their first caption.
  """
  if split not in COCO_SPLITS:
    raise ValueError(f'COCO split must be one of {COCO_SPLITS}, got {split!r}')
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'COCO root folder not found: {root}')
  ann = _first_existing([os.path.join(root, 'annotations', 'captions_val2017.json'),
                         os.path.join(root, 'captions_val2017.json')], 'COCO captions json')
  image_dir = _first_existing([os.path.join(root, 'images', 'val2017'),
                               os.path.join(root, 'val2017')], 'COCO val2017 image folder')
  data = _load_json(ann)
  try:
    id_to_file = {im['id']: im['file_name'] for im in data['images']}
    annotations = [(a['image_id'], a['caption']) for a in data['annotations']]
  except (KeyError, TypeError) as e:
    raise ValueError(f'{ann}: not in the COCO captions layout (missing {e})') from None
  index, paths, captions, txt_to_img = {}, [], [], []
  for image_id, caption in annotations:
    if image_id not in id_to_file:
      continue  # As the reference: captions of unlisted images are dropped.
    if image_id not in index:
      index[image_id] = len(paths)
      paths.append(os.path.join(image_dir, id_to_file[image_id]))
    captions.append(caption)
    txt_to_img.append(index[image_id])
  _check_files(paths, ann)
  return RetrievalDataset(f'coco_{split}2017', paths, captions, np.array(txt_to_img, np.int64))


def flickr30k(root: str, split: str = 'val') -> RetrievalDataset:
  """Flickr30k in the BLIP json layout: ``flickr30k_{split}.json`` = [{image, caption: [..]}].

  The reference reads the *val* json (1,014 images / 5,070 captions); 'test' is the usual 1k
  split. The json is looked for in ``root`` and ``root/flickr30k-images``; image paths are
  relative to ``root`` or, as in the reference's layout, to the json folder's parent.
  """
  if split not in FLICKR_SPLITS:
    raise ValueError(f'Flickr30k split must be one of {FLICKR_SPLITS}, got {split!r}')
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Flickr30k root folder not found: {root}')
  fname = f'flickr30k_{split}.json'
  ann = _first_existing([os.path.join(root, fname),
                         os.path.join(root, 'flickr30k-images', fname)], f'Flickr30k {fname}')
  data = _load_json(ann)
  if not isinstance(data, list) or not all(isinstance(d, dict) and 'image' in d and 'caption' in d
                                           for d in data):
    raise ValueError(f'{ann}: not in the BLIP layout (a list of {{"image", "caption"}})')
  bases = [root, os.path.dirname(os.path.dirname(os.path.abspath(ann)))]
  base = next((b for b in bases if data and os.path.isfile(os.path.join(b, data[0]['image']))),
              root)
  paths, captions, txt_to_img = [], [], []
  for i, entry in enumerate(data):
    paths.append(os.path.join(base, entry['image']))
    caps = entry['caption']
    caps = [caps] if isinstance(caps, str) else list(caps)
    captions.extend(caps)
    txt_to_img.extend([i] * len(caps))
  _check_files(paths, ann)
  return RetrievalDataset(f'flickr30k_{split}', paths, captions, np.array(txt_to_img, np.int64))


def caption_of(meta: dict[str, Any]) -> str:
  """The synthetic retrieval caption: the `raw_caption` sentence(s), joined."""
  return '. '.join(meta['raw_caption']) + '.'


def synthetic(data: SyntheticDataset | SyntheticConfig) -> RetrievalDataset:
  """The synthetic val split, one caption per image (near-duplicate groups make it hard)."""
  ds = data if isinstance(data, SyntheticDataset) else SyntheticDataset(data, split='val')
  images, captions = [], []
  for i in range(len(ds)):
    item = ds[i]
    images.append(item['image'])
    captions.append(caption_of(item['meta']))
  return RetrievalDataset(f'synthetic_{ds.split}', images, captions, np.arange(len(ds)))
