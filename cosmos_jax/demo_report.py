"""The demo's results table (mean and spread over seeds) and its summary figure.

A *group* is one method (COSMOS or the CLIP baseline) trained with several seeds on the same
data and budget; every cell of the table is that group's mean, with the sample standard
deviation over its seeds when there are several.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

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
# Metrics drawn against step in the summary figure: (row label, metrics.jsonl key suffix).
CURVE_METRICS = (
    ('text->image R@1', 'retrieval/synthetic/t2i_R@1'),
    ('shape top-1', 'classification/synthetic/top1'),
    ('segmentation mIoU', 'segmentation/synthetic/mIoU'),
)


def value(results: Mapping, task: str, dataset: str, metric: str) -> Optional[float]:
  return results.get(task, {}).get(dataset, {}).get(metric)


def summarize(values: Sequence[Optional[float]]) -> Optional[tuple[float, float, int]]:
  """(mean, sample standard deviation, count) of the values present; None when none is."""
  present = np.array([v for v in values if v is not None], np.float64)
  if not present.size:
    return None
  sd = float(present.std(ddof=1)) if present.size > 1 else 0.0
  return float(present.mean()), sd, int(present.size)


def number(x: Optional[float]) -> str:
  if x is None:
    return ''
  return f'{x:.1f}' if abs(x) >= 1 else f'{x:.2f}'


def cell(summary: Optional[tuple[float, float, int]]) -> str:
  if summary is None:
    return ''
  mean, sd, n = summary
  return number(mean) if n == 1 else f'{number(mean)} ± {sd:.1f}'


def table_cells(groups: Sequence[tuple[str, Sequence[Mapping]]],
                chance: Mapping[str, float]) -> tuple[list[str], list[list[str]]]:
  """Header and rows: one column per group, COSMOS - CLIP when both are there, chance."""
  names = [name for name, _ in groups]
  with_diff = len(groups) == 2
  header = ['metric'] + names + ([f'{names[0]} - {names[1]}'] if with_diff else []) + ['chance']
  rows = []
  for task, dataset, metric, label in TABLE_ROWS:
    per_group = [[value(r, task, dataset, metric) for r in results] for _, results in groups]
    row = [label] + [cell(summarize(v)) for v in per_group]
    if with_diff:
      a, b = (summarize(v) for v in per_group)
      row.append('' if a is None or b is None else f'{a[0] - b[0]:+.1f}')
    rows.append(row + [number(chance.get(metric))])
  return header, rows


def format_table(groups: Sequence[tuple[str, Sequence[Mapping]]],
                 chance: Mapping[str, float]) -> str:
  """A markdown table of ``table_cells``."""
  header, rows = table_cells(groups, chance)
  lines = ['| ' + ' | '.join(header) + ' |', '|---|' + '---:|' * (len(header) - 1)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines)


def _series(records: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
  points = [(r['step'], r[key]) for r in records if key in r and 'step' in r]
  return [p[0] for p in points], [p[1] for p in points]


def plot_summary(groups: Sequence[tuple[str, Sequence[tuple[str, str]]]],
                 table: tuple[list[str], list[list[str]]], png_path: str,
                 title: str = '', chance: Optional[Mapping[str, float]] = None) -> str:
  """Curves of every run (CLIP loss, the evaluated metrics) above the results table.

  ``groups``: (name, [(workdir, evaluated tree), ...]) per method, one entry per seed;
  ``chance``: metric -> chance level, drawn as a dashed line.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from cosmos_jax.train.reporting import read_jsonl

  panels = [('CLIP loss (student)', None)] + list(CURVE_METRICS)
  fig = plt.figure(figsize=(4 * len(panels), 7.2))
  grid = fig.add_gridspec(2, len(panels), height_ratios=(1.0, 0.9))
  axes = [fig.add_subplot(grid[0, i]) for i in range(len(panels))]
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for g, (name, runs) in enumerate(groups):
    for s, (workdir, tree) in enumerate(runs):
      records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
      label = name if s == 0 else None
      for ax, (_, suffix) in zip(axes, panels):
        key = 'clip_loss' if suffix is None else f'eval/{tree}/{suffix}'
        steps, values = _series(records, key)
        if steps:
          ax.plot(steps, values, color=colours[g % len(colours)], label=label, linewidth=1.1,
                  alpha=0.8, marker=None if suffix is None else 'o', markersize=3)
  for ax, (panel_title, suffix) in zip(axes, panels):
    level = None if suffix is None or chance is None else chance.get(suffix.rsplit('/', 1)[-1])
    if level is not None:
      ax.axhline(level, color='0.5', linestyle='--', linewidth=1, label='chance')
    ax.set_title(panel_title + ('' if suffix is None else ' (%)'), fontsize=10)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  header, rows = table
  tab_ax = fig.add_subplot(grid[1, :])
  tab_ax.axis('off')
  tab = tab_ax.table(cellText=rows, colLabels=header, loc='center', cellLoc='right',
                     colLoc='right')
  tab.auto_set_font_size(False)
  tab.set_fontsize(10)
  tab.scale(1, 1.5)
  for (r, c), item in tab.get_celld().items():
    if c == 0:
      item.set_text_props(ha='left')
    if r == 0:
      item.set_text_props(weight='bold')
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  fig.savefig(png_path, dpi=90)
  plt.close(fig)
  return png_path


def describe_recipe(config: Any) -> str:
  """One line naming the model, budget and data of a demo config."""
  s, d, v = config.data.synthetic, config.data, config.model.variant
  model = 'tiny model' if v == 'tiny' else _variant_name(v)
  return (f'{model}, {config.total_steps} steps at batch {config.batch_size}, lr '
          f'{config.optim.lr:g}, on {s.num_train:,} synthetic {s.image_size} px images '
          f'({d.global_size} px global and {d.num_local} x {d.local_size} px local crops)')


def _variant_name(variant: str) -> str:
  import json
  try:
    v = json.loads(variant)['vision_cfg']
    return f"tiny model at {v['image_size']} px ({v['patch_size']} px patches)"
  except (ValueError, KeyError, TypeError):
    return variant
