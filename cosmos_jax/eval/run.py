"""Runs any subset of the evaluations and writes results.json, results.md and the PNGs.

A task is ``TASK:DATASET=ROOT`` (``retrieval:coco=/data/coco``,
``classification:imagenet=/data/imagenet/val``, ``segmentation:voc20=/data/VOCdevkit/VOC2012``)
or ``synthetic``, the three evaluations on the embedded dataset's validation split.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp

from cosmos_jax.data import synthetic as synthetic_data
from cosmos_jax.eval import classification, report, retrieval, seg_datasets, segmentation
from cosmos_jax.eval.encode import Encoder
from cosmos_jax.models import ModelConfig

def _optional(root: str, name: str) -> Optional[str]:
  path = os.path.join(root, name)
  return path if os.path.isfile(path) else None


RETRIEVAL: dict[str, Callable[[str], retrieval.RetrievalDataset]] = {
    'coco': retrieval.coco,
    'flickr30k': retrieval.flickr30k,
    'flickr30k_test': lambda root: retrieval.flickr30k(root, split='test'),
}
CLASSIFICATION: dict[str, Callable[[str], classification.ClassificationDataset]] = {
    'imagenet': classification.imagenet,
    'folder': lambda root: classification.image_folder(   # class subfolders
        root, _optional(root, 'classnames.txt'), _optional(root, 'templates.txt')),
}
SEGMENTATION = tuple(c for c in segmentation.SEG_CONFIGS if c != 'synthetic')


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  task: str        # 'retrieval', 'classification', 'segmentation' or 'synthetic'
  dataset: str
  root: str = ''


def parse_task(spec: str) -> TaskSpec:
  if spec == 'synthetic':
    return TaskSpec('synthetic', 'synthetic')
  head, eq, root = spec.partition('=')
  task, colon, dataset = head.partition(':')
  known = {'retrieval': RETRIEVAL, 'classification': CLASSIFICATION,
           'segmentation': SEGMENTATION}
  if not (eq and colon) or task not in known:
    raise ValueError(f'bad task {spec!r}: use TASK:DATASET=ROOT with TASK one of '
                     f'{sorted(known)}, or "synthetic"')
  if dataset not in known[task]:
    raise ValueError(f'unknown {task} dataset {dataset!r}; known: {", ".join(known[task])}')
  if not os.path.exists(root):
    raise FileNotFoundError(f'{task}:{dataset}: dataset folder not found: {root}')
  return TaskSpec(task, dataset, root)


def _retrieval(encoder: Encoder, dataset: retrieval.RetrievalDataset, out_dir: str) -> dict:
  return retrieval.evaluate_retrieval(
      encoder, dataset, grid_path=os.path.join(out_dir, f'retrieval_{dataset.name}.png'))


def _synthetic(config: ModelConfig, params: Any, encoder: Encoder, out_dir: str,
               synthetic_config: synthetic_data.SyntheticConfig, progress: bool,
               mesh: Any) -> dict[str, dict]:
  val = synthetic_data.SyntheticDataset(synthetic_config, split='val')
  results = {'retrieval': {'synthetic': _retrieval(encoder, retrieval.synthetic(val), out_dir)}}
  results['classification'] = {
      'synthetic': classification.evaluate_classification(encoder, classification.synthetic(val))}
  seg_ds = seg_datasets.SyntheticSeg(val)
  seg_cfg = dataclasses.replace(segmentation.SEG_CONFIGS['synthetic'],
                                short_side=synthetic_config.image_size,
                                crop=config.vision.image_size, stride=config.vision.image_size // 2)
  results['segmentation'] = {'synthetic': segmentation.evaluate_segmentation(
      config, params, seg_ds, seg_cfg, progress=progress, mesh=mesh,
      overlay_dir=os.path.join(out_dir, 'overlays_synthetic'))}
  return results


def run(config: ModelConfig, params: Any, tasks: Sequence[TaskSpec], out_dir: str, *,
        mesh: Any = None, dtype: Any = jnp.float32, batch_size: int = 256,
        synthetic_config: Optional[synthetic_data.SyntheticConfig] = None,
        progress: bool = True) -> dict[str, dict]:
  """Evaluates one parameter tree (the caller picks student or teacher) on ``tasks``."""
  os.makedirs(out_dir, exist_ok=True)
  encoder = Encoder(config, params, dtype=dtype, batch_size=batch_size, mesh=mesh,
                    progress=progress)
  results: dict[str, dict] = {}
  for spec in tasks:
    logging.info('evaluating %s:%s', spec.task, spec.dataset)
    if spec.task == 'synthetic':
      found = _synthetic(config, params, encoder, out_dir,
                         synthetic_config or synthetic_data.SyntheticConfig(image_size=64),
                         progress, mesh)
      for task, by_dataset in found.items():
        results.setdefault(task, {}).update(by_dataset)
    elif spec.task == 'retrieval':
      ds = RETRIEVAL[spec.dataset](spec.root)
      results.setdefault('retrieval', {})[spec.dataset] = _retrieval(encoder, ds, out_dir)
    elif spec.task == 'classification':
      ds = CLASSIFICATION[spec.dataset](spec.root)
      results.setdefault('classification', {})[spec.dataset] = \
          classification.evaluate_classification(encoder, ds)
    else:
      ds = seg_datasets.get_dataset(spec.dataset, spec.root)
      results.setdefault('segmentation', {})[spec.dataset] = segmentation.evaluate_segmentation(
          config, params, ds, spec.dataset, progress=progress, mesh=mesh,
          overlay_dir=os.path.join(out_dir, f'overlays_{spec.dataset}'))
  report.write_results(results, out_dir)
  return results
