"""Decoding + multi-crop per core, ours against the official code's, on the same JPEGs.

``augment_rates(jpegs, config, official_repo)`` times the same work both ways, each in a fresh
interpreter pinned to one core, in the caller's environment (no CPU tunables: a TPU host
runs without them), over the same JPEG bytes:

  * ours: ``pipeline.decode_image`` + ``augment.multi_crop`` (uint8 crops; the CLIP
    normalisation happens on the device);
  * theirs: ``Image.open(...).convert('RGB')`` (webdataset's ``pilrgb`` decoder) + their
    ``open_clip.transform.DataAugmentationMulticrop`` (imported from ``<repo>/src``, torch on
    one thread), whose ``ToTensor`` + ``Normalize`` run on the host in their pipeline.

Text cropping and tokenising are left out of both (ours costs 0.6 ms a sample, theirs is
open_clip's pure-Python BPE); tar reading and batching too. Each rate is the best of
``repeats`` passes over all images after one warm-up pass.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from typing import Any, Optional

# The official multi-crop's local crops are always 96 px and its scales come from one number.
OFFICIAL_LOCAL_SIZE = 96
OFFICIAL_LOCAL_MIN_SCALE = 0.05


def jpegs_in(tar_paths: list[str], per_shard: Optional[int] = None) -> list[bytes]:
  """The .jpg members of the tar shards in order, the first ``per_shard`` of each if given."""
  out = []
  for path in tar_paths:
    with tarfile.open(path) as tar:
      found = 0
      for member in tar:
        if per_shard is not None and found == per_shard:
          break
        if member.isfile() and member.name.endswith('.jpg'):
          out.append(tar.extractfile(member).read())
          found += 1
  return out


def official_crop_scale(data_config) -> float:
  """The official ``--crop-scale`` of a data config, or ValueError where theirs cannot express
  it (global (s, 1), local (0.05, s), 96 px locals)."""
  s = float(data_config.global_scale[0])
  if (tuple(data_config.global_scale) != (s, 1.0)
      or tuple(data_config.local_scale) != (OFFICIAL_LOCAL_MIN_SCALE, s)
      or int(data_config.local_size) != OFFICIAL_LOCAL_SIZE):
    raise ValueError(
        f'the official multi-crop has global scale (s, 1), local scale (0.05, s) and 96 px '
        f'locals; this config has {tuple(data_config.global_scale)}, '
        f'{tuple(data_config.local_scale)} and {data_config.local_size} px')
  return s


def augment_rates(jpegs: list[bytes], config, official_repo: Optional[str] = None,
                  repeats: int = 3) -> dict[str, float]:
  """{'ours_augment_samples_per_s_per_core'[, 'official_augment_samples_per_s_per_core']}."""
  from cosmos_jax.train.from_config import pipeline_config
  d = config.data
  spec: dict[str, Any] = {'multicrop': dataclasses.asdict(pipeline_config(config).multicrop),
                          'repeats': int(repeats)}
  theirs = None
  if official_repo:   # checked before anything is timed
    src = os.path.join(os.path.abspath(official_repo), 'src')
    if not os.path.isfile(os.path.join(src, 'open_clip', 'transform.py')):
      raise FileNotFoundError(f'{official_repo} is not a checkout of ExplainableML/cosmos '
                              '(no src/open_clip/transform.py)')
    theirs = dict(spec, impl='official', src=src, crop_scale=official_crop_scale(d))
  with tempfile.NamedTemporaryFile(suffix='.jpegs') as f:
    for data in jpegs:   # length-prefixed, so the worker needs no tar reader of ours
      f.write(len(data).to_bytes(8, 'little') + data)
    f.flush()
    rates = {'ours_augment_samples_per_s_per_core':
             _run_worker(dict(spec, impl='ours', jpegs=f.name))}
    if theirs:
      rates['official_augment_samples_per_s_per_core'] = _run_worker(dict(theirs, jpegs=f.name))
  return rates


def _run_worker(spec: dict[str, Any]) -> float:
  from cosmos_jax.xla_cpu import host as xla_cpu_host
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(spec),
                        capture_output=True, text=True,
                        cwd=os.path.dirname(spec['src']) if 'src' in spec else None,
                        env=xla_cpu_host.caller_environment())
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    raise RuntimeError(f"timing the {spec['impl']} augmentation failed (exit "
                       f'{proc.returncode}):\n{proc.stderr[-4000:]}')
  return float(json.loads(lines[-1])['samples_per_s'])


# ---------------------------------------------------------------------------------------------
# The worker: its own interpreter, one core.


def _read_jpegs(path: str) -> list[bytes]:
  out = []
  with open(path, 'rb') as f:
    while header := f.read(8):
      out.append(f.read(int.from_bytes(header, 'little')))
  return out


def _ours(spec: dict):
  import numpy as np
  from cosmos_jax.data import augment, pipeline
  cfg = augment.MultiCropConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in spec['multicrop'].items()})
  rng = np.random.default_rng(0)
  return lambda data: augment.multi_crop(pipeline.decode_image(data), rng, cfg)


def _official(spec: dict):
  import torch
  from PIL import Image
  torch.set_num_threads(1)
  sys.path[0:1] = [spec['src']]    # their open_clip, not this folder's or site's
  from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
  from open_clip.transform import DataAugmentationMulticrop
  crops = spec['multicrop']
  transform = DataAugmentationMulticrop(
      OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, crops['global_size'], crops['num_local'],
      crop_scale=spec['crop_scale'])
  return lambda data: transform(Image.open(io.BytesIO(data)).convert('RGB'))


def _worker(spec: dict) -> dict:
  import time
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  jpegs = _read_jpegs(spec['jpegs'])
  one = _official(spec) if spec['impl'] == 'official' else _ours(spec)
  for data in jpegs:   # warm-up: imports, allocator, caches
    one(data)
  best = float('inf')
  for _ in range(spec['repeats']):
    start = time.perf_counter()
    for data in jpegs:
      one(data)
    best = min(best, time.perf_counter() - start)
  return {'samples_per_s': len(jpegs) / best}


if __name__ == '__main__':
  print(json.dumps(_worker(json.loads(sys.stdin.read()))))
