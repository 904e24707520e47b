"""The CPU demo: train the tiny COSMOS on the embedded synthetic dataset, evaluate, show.

``make demo`` trains for a fixed budget (``demo_config``), evaluates the teacher on the
synthetic validation split (retrieval, shape classification, zero-shot segmentation), prints
the results next to chance level, and points at the PNGs (loss curves, segmentation overlays,
retrieval grid). ``make demo-compare`` trains the CLIP-only baseline on the same budget and
prints both side by side. A finished run in the work directory is reused, not retrained.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from cosmos_jax.config import base_config

# (task, dataset, metric, label) rows of the results table.
TABLE_ROWS = (
    ('retrieval', 'synthetic', 'i2t_R@1', 'retrieval image->text R@1'),
    ('retrieval', 'synthetic', 'i2t_R@5', 'retrieval image->text R@5'),
    ('retrieval', 'synthetic', 't2i_R@1', 'retrieval text->image R@1'),
    ('retrieval', 'synthetic', 't2i_R@5', 'retrieval text->image R@5'),
    ('classification', 'synthetic', 'top1', 'shape classification top-1'),
    ('classification', 'synthetic', 'top5', 'shape classification top-5'),
    ('segmentation', 'synthetic', 'mIoU', 'zero-shot segmentation mIoU'),
)


def demo_config(arg: str = '') -> ml_collections.ConfigDict:
  """The tiny model on 64 px synthetic images; ``arg='clip'``: the CLIP-only baseline."""
  if arg not in ('', 'clip'):
    raise ValueError(f"demo config argument must be '' or 'clip', got {arg!r}")
  c = base_config()
  c.model.variant = 'tiny'
  c.batch_size = 32
  c.total_steps = 600
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.1
  c.ema.momentum = 0.99
  c.data.train = 'synthetic:train'
  c.data.synthetic.image_size = 64
  c.data.synthetic.num_train = 8000
  c.data.synthetic.num_val = 400
  c.data.global_size, c.data.local_size = 32, 16
  c.data.worker_count = 0
  c.mesh.shape = (-1, 1, 1)
  c.mesh.preset = 'dp'
  c.checkpoint.every_steps = 200
  c.log_every_steps = 25
  c.eval.tasks = ('synthetic',)
  c.eval.every_steps = 300
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
  return chance


def _synthetic_chance(config: ml_collections.ConfigDict) -> dict[str, float]:
  from cosmos_jax.data.synthetic import SyntheticConfig, SyntheticDataset
  s = config.data.synthetic
  val = SyntheticDataset(SyntheticConfig(image_size=s.image_size, num_val=s.num_val), 'val')
  masks = [val[i]['mask'] for i in range(len(val))]
  return chance_levels(len(val), s.image_size, len(val.class_names()), masks)


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
                       overrides: Sequence[str] = ()) -> DemoRun:
  import time
  from cosmos_jax.config_cli import apply_overrides
  from cosmos_jax.train import loop
  config = demo_config('clip' if baseline else '')
  apply_overrides(config, overrides)
  if steps:
    config.total_steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 4)
    config.eval.every_steps = steps // 2
  start = time.perf_counter()
  result = loop.train(config, workdir)
  trained = bool(result['evaluations'])
  results, results_dir = _final_results(workdir, config)
  return DemoRun('CLIP' if baseline else 'COSMOS', workdir, config, results, results_dir,
                 (time.perf_counter() - start) / 60 if trained else None)


def _value(results: dict, task: str, dataset: str, metric: str) -> Optional[float]:
  return results.get(task, {}).get(dataset, {}).get(metric)


def _cell(value: Optional[float]) -> str:
  if value is None:
    return ''
  return f'{value:.1f}' if abs(value) >= 1 else f'{value:.2f}'


def format_table(runs: list[DemoRun], chance: dict[str, float]) -> str:
  """A markdown table: one row per metric, one column per run, then chance level."""
  head = '| metric | ' + ' | '.join(r.name for r in runs) + ' | chance |'
  lines = [head, '|---|' + '---:|' * (len(runs) + 1)]
  for task, dataset, metric, label in TABLE_ROWS:
    values = [_value(r.results, task, dataset, metric) for r in runs]
    cells = [_cell(v) for v in values] + [_cell(chance.get(metric))]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def describe(run: DemoRun) -> str:
  c = run.config
  s = c.data.synthetic
  took = (f'trained + evaluated in {run.minutes:.1f} min' if run.minutes is not None
          else 'reused a finished run')
  tree = 'teacher (EMA)' if c.model.cosmos else 'model'
  return (f'{run.name}: {c.model.variant} model, {c.total_steps} steps at batch {c.batch_size} '
          f'on {s.num_train:,} synthetic {s.image_size} px images; {tree} evaluated on '
          f'{s.num_val} val images; {took}')


def plot_comparison(runs: list[DemoRun], png_path: str) -> str:
  """CLIP loss and text->image R@1 of each run against step, on shared axes."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from cosmos_jax.train.reporting import read_jsonl

  fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(9, 3.4))
  for run in runs:
    records = read_jsonl(os.path.join(run.workdir, 'metrics.jsonl'))
    loss = [(r['step'], r['clip_loss']) for r in records if 'clip_loss' in r]
    if loss:
      ax_loss.plot(*zip(*loss), label=run.name, linewidth=1.2)
    tree = 'teacher' if run.config.model.cosmos else 'student'
    key = f'eval/{tree}/retrieval/synthetic/t2i_R@1'
    r1 = [(r['step'], r[key]) for r in records if key in r]
    if r1:
      ax_r1.plot(*zip(*r1), marker='o', label=run.name)
  ax_loss.set_title('CLIP loss (student)', fontsize=10)
  ax_r1.set_title('synthetic val text->image R@1 (%)', fontsize=10)
  for ax in (ax_loss, ax_r1):
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  fig.savefig(png_path, dpi=90)
  plt.close(fig)
  return png_path


def run_demo(workdir: str, *, compare: bool = False, steps: Optional[int] = None,
             overrides: Sequence[str] = ()) -> str:
  """Trains (or reuses) the demo run(s) under ``workdir``; returns the report to print."""
  runs = [train_and_evaluate(os.path.join(workdir, 'cosmos'), steps=steps, overrides=overrides)]
  if compare:
    runs.append(train_and_evaluate(os.path.join(workdir, 'clip'), baseline=True, steps=steps,
                                   overrides=overrides))
  chance = _synthetic_chance(runs[0].config)
  lines = [describe(r) for r in runs] + ['', format_table(runs, chance), '',
           'chance: a uniformly random guess (segmentation: per pixel, from the label counts)',
           '', 'pictures:']
  pictures = []
  for r in runs:
    pictures += [(f'{r.name} loss curves', os.path.join(r.workdir, 'plots', 'curves.png')),
                 (f'{r.name} segmentation overlays',
                  os.path.join(r.results_dir, 'overlays_synthetic') + os.sep),
                 (f'{r.name} retrieval grid',
                  os.path.join(r.results_dir, 'retrieval_synthetic_val.png'))]
  if compare:
    pictures.append(('side by side', plot_comparison(runs, os.path.join(workdir, 'compare.png'))))
  width = max(len(name) for name, _ in pictures) + 1
  lines += [f'  {name + ":":<{width}} {path}' for name, path in pictures]
  lines.append(f'  TensorBoard: tensorboard --logdir {workdir}')
  return '\n'.join(lines)
