"""Evaluation results as JSON and a markdown table, and a PNG grid of top retrievals.

Results are nested dicts ``{task: {dataset: {metric: value}}}``.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from cosmos_jax.eval.encode import load_image

Results = Mapping[str, Mapping[str, Mapping[str, Any]]]


def _plain(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def rows(results: Results) -> list[tuple[str, str, str, Any]]:
  """(task, dataset, metric, value) in insertion order."""
  return [(task, ds, metric, value)
          for task, by_ds in results.items()
          for ds, metrics in by_ds.items()
          for metric, value in metrics.items()]


def _fmt(value: Any) -> str:
  if isinstance(value, (float, np.floating)):
    return f'{float(value):.2f}'
  return str(value)


def markdown_table(results: Results) -> str:
  lines = ['| task | dataset | metric | value |', '|---|---|---|---:|']
  lines += [f'| {t} | {d} | {m} | {_fmt(v)} |' for t, d, m, v in rows(results)]
  return '\n'.join(lines) + '\n'


def write_results(results: Results, out_dir: str, stem: str = 'results') -> tuple[str, str]:
  """Writes ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns both paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, f'{stem}.json')
  md_path = os.path.join(out_dir, f'{stem}.md')
  with open(json_path, 'w') as f:
    json.dump(_plain(results), f, indent=2)
    f.write('\n')
  with open(md_path, 'w') as f:
    f.write(markdown_table(results))
  return json_path, md_path


def retrieval_grid_png(images: Sequence[Any], captions: Sequence[str], sim: np.ndarray,
                       path: str, queries: int = 4, top_k: int = 5,
                       txt_to_img: Optional[np.ndarray] = None,
                       query_indices: Optional[Sequence[int]] = None) -> str:
  """One row per text query: the caption, then its ``top_k`` images with their scores.

  ``images`` are paths, uint8 arrays or PIL images; ``sim`` is (n_img, n_txt). Queries are
  spread evenly over the captions unless ``query_indices`` is given; with ``txt_to_img`` the
  ground-truth image is framed green and the others red.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  sim = np.asarray(sim)
  n_img, n_txt = sim.shape
  top_k = min(top_k, n_img)
  if query_indices is None:
    query_indices = np.unique(np.linspace(0, n_txt - 1, min(queries, n_txt)).astype(int))
  q = len(query_indices)
  fig, axes = plt.subplots(q, top_k + 1, figsize=(2.2 * (top_k + 1.5), 2.3 * q), squeeze=False)
  for r, t in enumerate(query_indices):
    ax = axes[r, 0]
    ax.axis('off')
    ax.text(0.0, 0.5, textwrap.fill(captions[t], 28), va='center', ha='left', fontsize=8,
            wrap=True)
    order = np.argsort(-sim[:, t], kind='stable')[:top_k]
    for c, i in enumerate(order):
      ax = axes[r, c + 1]
      ax.imshow(np.asarray(load_image(images[i])))
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f'#{c + 1}  {sim[i, t]:.3f}', fontsize=8)
      if txt_to_img is not None:
        colour = 'tab:green' if i == txt_to_img[t] else 'tab:red'
        for spine in ax.spines.values():
          spine.set_edgecolor(colour)
          spine.set_linewidth(3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
