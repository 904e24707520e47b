"""The CPU demo: train the tiny COSMOS on the embedded synthetic dataset, evaluate, show.

``make demo`` trains for a fixed budget (``demo_config``), evaluates the teacher on the
synthetic validation split (retrieval, shape classification, zero-shot segmentation), prints
the results next to chance level, and points at the PNGs (loss curves, segmentation overlays,
retrieval grid, ``summary.png``). ``make demo-compare`` trains COSMOS and the CLIP-only
baseline on the same data and budget with three seeds each and prints the mean and spread of
every metric side by side. A finished run in the work directory is reused, not retrained.

This module is an entry point, like ``cli.py``: it drives ``train.loop`` and nothing below it
imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from cosmos_jax import demo_report
from cosmos_jax.config import base_config

COMPARE_SEEDS = (0, 1, 2)


# The tiny model's towers with 64 px images in 8 px patches (an 8 x 8 grid; 32 px local crops
# give 4 x 4): at the `tiny` variant's 32 px, a medium shape is one patch and its outline is
# lost, so shape classification and segmentation stay near chance.
DEMO_MODEL = json.dumps({
    'embed_dim': 64,
    'vision_cfg': {'image_size': 64, 'patch_size': 8, 'width': 64, 'layers': 2, 'head_width': 32,
                   'attn_pooler_heads': 4},
    'text_cfg': {'width': 64, 'heads': 2, 'layers': 2, 'attn_pooler_heads': 4}},
    separators=(',', ':'))


def demo_config(arg: str = '') -> ml_collections.ConfigDict:
  """The tiny towers on 64 px synthetic images; ``arg='clip'``: the CLIP-only baseline."""
  if arg not in ('', 'clip'):
    raise ValueError(f"demo config argument must be '' or 'clip', got {arg!r}")
  c = base_config()
  c.model.variant = DEMO_MODEL
  c.batch_size = 32
  c.total_steps = 1000
  c.optim.lr = 2e-3            # a 2-block, 64-wide model trains stably at this rate
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1
  c.ema.momentum = 0.99
  c.data.train = 'synthetic:train'
  c.data.synthetic.image_size = 64
  c.data.synthetic.num_train = 8000
  c.data.synthetic.num_val = 400
  c.data.global_size, c.data.local_size = 64, 32
  c.data.worker_count = 0
  c.mesh.shape = (-1, 1, 1)
  c.mesh.preset = 'dp'
  c.checkpoint.every_steps = 250
  c.log_every_steps = 25
  c.eval.tasks = ('synthetic',)
  c.eval.every_steps = 500
  c.eval.batch_size = 200
  if arg == 'clip':
    c.model.cosmos = False
    c.eval.which = 'student'   # a CLIP-only run has no teacher
  return c


@dataclasses.dataclass
class DemoRun:
  name: str                   # 'COSMOS' or 'CLIP'
  workdir: str
  config: ml_collections.ConfigDict
  results: dict[str, Any]     # {task: {dataset: {metric: value}}} of the final evaluation
  results_dir: str
  minutes: Optional[float]    # None when a finished run was reused
  seed: int = 0

  @property
  def tree(self) -> str:
    return 'teacher' if self.config.model.cosmos else 'student'


def chance_levels(num_val: int, image_size: int, num_shapes: int,
                  masks: Optional[list[np.ndarray]] = None) -> dict[str, float]:
  """What a uniformly random guess scores on the synthetic val split, in percent.

  Retrieval has one caption per image; segmentation's chance is the expected mIoU of a
  per-pixel uniform guess over background + shapes, worked out from the label histogram.
  """
  chance = {'i2t_R@1': 100 / num_val, 'i2t_R@5': 500 / num_val, 't2i_R@1': 100 / num_val,
            't2i_R@5': 500 / num_val, 'top1': 100 / num_shapes,
            'top5': 100 * min(5, num_shapes) / num_shapes}
  if masks is not None:
    k = num_shapes + 1
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=k)[:k]
    total = counts.sum()
    # E[intersection] = n_c / k, E[prediction] = N / k, so IoU_c = (n_c/k) / (n_c + N/k - n_c/k).
    iou = (counts / k) / (counts + total / k - counts / k)
    chance['mIoU'] = 100 * float(iou.mean())
    # Every pixel labelled background: class 0's IoU is its share of the pixels, a class in
    # the labels scores 0, and one neither labelled nor predicted is left out (as in miou).
    chance['mIoU_all_background'] = 100 * float(counts[0] / total / np.count_nonzero(counts))
  return chance


def _synthetic_chance(config: ml_collections.ConfigDict) -> dict[str, float]:
  from cosmos_jax.data.synthetic import SyntheticDataset, config_from_fields
  val = SyntheticDataset(config_from_fields(config.data.synthetic.to_dict()), 'val')
  masks = [val[i]['mask'] for i in range(len(val))]
  return chance_levels(len(val), val.config.image_size, len(val.class_names()), masks)


def _final_results(workdir: str, config: ml_collections.ConfigDict) -> tuple[dict, str]:
  tree = config.eval.which if config.eval.which != 'both' else 'teacher'
  out = os.path.join(workdir, 'eval', f'step_{config.total_steps}', tree)
  path = os.path.join(out, 'results.json')
  if not os.path.isfile(path):   # e.g. killed during the final evaluation: evaluate now
    from cosmos_jax.eval import run as eval_run
    from cosmos_jax.train.evaluation import InLoopEval
    from cosmos_jax.train.weights import load_for_eval
    model_cfg, params = load_for_eval(workdir, which=tree)
    ev = InLoopEval(config, model_cfg, workdir, mesh=None)
    eval_run.run(model_cfg, params, ev.tasks, out, batch_size=ev.batch_size,
                 synthetic_config=ev.synthetic)
  with open(path) as f:
    return json.load(f), out


def train_and_evaluate(workdir: str, *, baseline: bool = False, steps: Optional[int] = None,
                       overrides: Sequence[str] = (), seed: Optional[int] = None) -> DemoRun:
  """Trains (or reuses, or resumes) one demo run and returns its final evaluation."""
  import time
  from cosmos_jax.config_cli import apply_overrides
  from cosmos_jax.train import loop
  config = demo_config('clip' if baseline else '')
  apply_overrides(config, overrides)
  if steps:
    config.total_steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 4)
    config.eval.every_steps = max(1, steps // 2)
  if seed is not None:
    config.seed = seed
  start = time.perf_counter()
  result = loop.train(config, workdir)
  trained = bool(result['evaluations'])
  results, results_dir = _final_results(workdir, config)
  return DemoRun('CLIP' if baseline else 'COSMOS', workdir, config, results, results_dir,
                 (time.perf_counter() - start) / 60 if trained else None, config.seed)


def describe(run: DemoRun) -> str:
  took = (f'trained + evaluated in {run.minutes:.1f} min' if run.minutes is not None
          else 'reused a finished run')
  tree = 'teacher (EMA)' if run.config.model.cosmos else 'model'
  return (f'{run.name} seed {run.seed}: {demo_report.describe_recipe(run.config)}; {tree} '
          f'evaluated on {run.config.data.synthetic.num_val} val images; {took}')


def _run_dir(workdir: str, name: str, seed: int) -> str:
  # Seed 0 of the comparison is the run `make demo` trains, so it is reused.
  return os.path.join(workdir, name if seed == 0 else f'{name}_seed{seed}')


def run_demo(workdir: str, *, compare: bool = False, steps: Optional[int] = None,
             overrides: Sequence[str] = (), seeds: Optional[Sequence[int]] = None) -> str:
  """Trains (or reuses) the demo run(s) under ``workdir``; returns the report to print.

  Without ``compare``: COSMOS with the config's seed. With it: COSMOS and the CLIP-only
  baseline for each of ``seeds`` (default ``COMPARE_SEEDS``), the table giving the mean and
  sample standard deviation over the seeds.
  """
  seeds = tuple(seeds) if seeds is not None else (COMPARE_SEEDS if compare else (None,))
  methods = [('COSMOS', 'cosmos', False)] + ([('CLIP', 'clip', True)] if compare else [])
  groups: list[tuple[str, list[DemoRun]]] = []
  for name, sub, baseline in methods:
    runs = [train_and_evaluate(_run_dir(workdir, sub, seed or 0), baseline=baseline, steps=steps,
                               overrides=overrides, seed=seed) for seed in seeds]
    groups.append((name, runs))
  all_runs = [r for _, runs in groups for r in runs]
  chance = _synthetic_chance(all_runs[0].config)
  by_group = [(name, [r.results for r in runs]) for name, runs in groups]
  n_seeds = len(seeds)
  spread = (f'mean ± standard deviation over {n_seeds} seeds; ' if n_seeds > 1 else '')
  summary = demo_report.plot_summary(
      [(name, [(r.workdir, r.tree) for r in runs]) for name, runs in groups],
      demo_report.table_cells(by_group, chance), os.path.join(workdir, 'summary.png'),
      title=demo_report.describe_recipe(all_runs[0].config)
      + (f', {n_seeds} seeds' if n_seeds > 1 else ''), chance=chance)
  lines = [describe(r) for r in all_runs] + ['', demo_report.format_table(by_group, chance), '',
           spread + 'chance: a uniformly random guess (segmentation: per pixel, from the label '
           f"counts); every pixel labelled background scores {chance['mIoU_all_background']:.1f} "
           'mIoU', '', 'pictures:']
  pictures = []
  for r in (runs[0] for _, runs in groups):
    pictures += [(f'{r.name} loss curves', os.path.join(r.workdir, 'plots', 'curves.png')),
                 (f'{r.name} segmentation overlays',
                  os.path.join(r.results_dir, 'overlays_synthetic') + os.sep),
                 (f'{r.name} retrieval grid',
                  os.path.join(r.results_dir, 'retrieval_synthetic_val.png'))]
  pictures.append(('curves and table', summary))
  width = max(len(name) for name, _ in pictures) + 1
  lines += [f'  {name + ":":<{width}} {path}' for name, path in pictures]
  lines.append(f'  TensorBoard: tensorboard --logdir {workdir}')
  return '\n'.join(lines)
