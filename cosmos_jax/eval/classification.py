"""Zero-shot classification (spec 5.3): folder datasets, prompts and top-1 / top-5 accuracy.

The classifier is the reference's: per class, the normalised mean of the normalised template
embeddings; ``logits = 100 * image_features @ W``. Accuracies are in percent; top-5 only
when there are at least 5 classes. ImageNet class names and the 80 OpenAI templates are
package data (``prompts/``), written out from open_clip's ``zero_shot_metadata.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cosmos_jax.data.synthetic import SyntheticConfig, SyntheticDataset
from cosmos_jax.eval.encode import Encoder

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prompts')
IMAGENET_CLASSES_FILE = os.path.join(PROMPTS_DIR, 'imagenet_classes.txt')
OPENAI_TEMPLATES_FILE = os.path.join(PROMPTS_DIR, 'openai_templates.txt')
# torchvision's ImageFolder extensions (compared lower-case).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
SYNTHETIC_TEMPLATES = ('a photo of a {}.', 'a {} shape.', 'an image of a {}.',
                       'a picture with a {} in it.')


@dataclasses.dataclass
class ClassificationDataset:
  """Images (paths or uint8 arrays), integer labels, class names and prompt templates."""
  name: str
  images: Sequence[Any]
  labels: np.ndarray
  class_names: list[str]
  templates: list[str]

  def __post_init__(self):
    self.labels = np.asarray(self.labels, np.int64)
    if len(self.images) != len(self.labels):
      raise ValueError(f'{self.name}: {len(self.images)} images but {len(self.labels)} labels')
    if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
      raise ValueError(f'{self.name}: labels outside [0, {len(self.class_names)})')


def read_lines(path: str) -> list[str]:
  """Non-empty stripped lines of a text file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'file not found: {path}')
  with open(path, encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def read_templates(path: str) -> list[str]:
  """Prompt templates, one per line, each with one '{}' where the class name goes."""
  templates = read_lines(path)
  for i, t in enumerate(templates):
    if t.count('{}') != 1:
      raise ValueError(f'{path}: template {i + 1} ({t!r}) must contain exactly one "{{}}"')
  if not templates:
    raise ValueError(f'{path}: no templates')
  return templates


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
  return tuple(read_lines(IMAGENET_CLASSES_FILE))


@functools.cache
def openai_templates() -> tuple[str, ...]:
  return tuple(read_templates(OPENAI_TEMPLATES_FILE))


def _scan_folder(root: str) -> tuple[list[str], list[str], list[int]]:
  """torchvision ImageFolder order: sorted class folders, sorted files walked per class."""
  folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if not folders:
    raise FileNotFoundError(f'no class folders in {root}')
  paths, labels = [], []
  for label, folder in enumerate(folders):
    found = 0
    for dirpath, _, files in sorted(os.walk(os.path.join(root, folder), followlinks=True)):
      for fname in sorted(files):
        if fname.lower().endswith(IMG_EXTENSIONS):
          paths.append(os.path.join(dirpath, fname))
          labels.append(label)
          found += 1
    if not found:
      raise FileNotFoundError(f'class folder {os.path.join(root, folder)} has no images '
                              f'({", ".join(IMG_EXTENSIONS)})')
  return folders, paths, labels


def image_folder(root: str, class_names_file: str | None = None,
                 templates_file: str | None = None, name: str | None = None,
                 templates: Sequence[str] | None = None) -> ClassificationDataset:
  """An ImageFolder-style dataset (class subfolders, labels in sorted folder order).

  Class names come from ``class_names_file`` (one per line, in label order; its length must
  match the number of folders), else from the folder names. Templates come from
  ``templates_file``, else ``templates``, else the 80 OpenAI ImageNet templates.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'dataset folder not found: {root}')
  folders, paths, labels = _scan_folder(root)
  if class_names_file is not None:
    class_names = read_lines(class_names_file)
    if len(class_names) != len(folders):
      raise ValueError(f'{class_names_file} lists {len(class_names)} class names but {root} has '
                       f'{len(folders)} class folders')
  else:
    class_names = [f.replace('_', ' ') for f in folders]
  if templates_file is not None:
    templates = read_templates(templates_file)
  elif templates is None:
    templates = openai_templates()
  return ClassificationDataset(name or os.path.basename(os.path.normpath(root)), paths,
                               np.array(labels, np.int64), list(class_names), list(templates))


def imagenet(root: str, name: str = 'imagenet_val') -> ClassificationDataset:
  """ImageNet-1k val as an ImageFolder (1,000 synset folders), open_clip names, 80 templates."""
  return image_folder(root, IMAGENET_CLASSES_FILE, OPENAI_TEMPLATES_FILE, name=name)


def synthetic(data: SyntheticDataset | SyntheticConfig,
              templates: Sequence[str] = SYNTHETIC_TEMPLATES) -> ClassificationDataset:
  """The synthetic val split as shape classification (label: the largest visible object)."""
  ds = data if isinstance(data, SyntheticDataset) else SyntheticDataset(data, split='val')
  images, labels = [], []
  for i in range(len(ds)):
    item = ds[i]
    images.append(item['image'])
    labels.append(item['label'])
  return ClassificationDataset(f'synthetic_{ds.split}_shapes', images, np.array(labels),
                               ds.class_names(), list(templates))


def label_ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """0-based rank of the true class in each row (ties broken by class index)."""
  logits = np.asarray(logits)
  labels = np.asarray(labels, np.int64)
  v = logits[np.arange(len(labels)), labels][:, None]
  before = np.arange(logits.shape[1])[None, :] < labels[:, None]
  return (logits > v).sum(1) + ((logits == v) & before).sum(1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """{'top1': %, 'top5': %} (top5 only with >= 5 classes)."""
  ranks = label_ranks(logits, labels)
  out = {'top1': 100.0 * float(np.mean(ranks < 1))}
  if np.shape(logits)[1] >= 5:
    out['top5'] = 100.0 * float(np.mean(ranks < 5))
  return out


def zero_shot_logits(encoder: Encoder, dataset: ClassificationDataset) -> np.ndarray:
  weights = encoder.class_embeddings(dataset.class_names, dataset.templates)  # (C, E)
  return 100.0 * encoder.image_files(dataset.images) @ weights.T


def evaluate_classification(encoder: Encoder, dataset: ClassificationDataset) -> dict[str, float]:
  logits = zero_shot_logits(encoder, dataset)
  return {**topk_accuracy(logits, dataset.labels), 'num_images': len(dataset.labels),
          'num_classes': len(dataset.class_names)}
