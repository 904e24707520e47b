"""What a run shows while it trains: a progress bar, metrics.jsonl, TensorBoard events, plots.

Only the primary host writes; every other host gets the same object with writing switched
off, so the loop does not branch on the host.
"""

from __future__ import annotations

import json
import numbers
import os
import sys
from typing import Any, Mapping, Optional

import tqdm

from cosmos_jax.train import distributed

# Curves drawn by plot_curves, one panel each; a panel is skipped when none of its keys logged.
PANELS = (
    ('loss', ('total_loss', 'clip_loss', 'distill_loss')),
    # student cross-modal image/text -> teacher image/text (losses.cosmos_loss)
    ('distillation terms', ('distill_i2i', 'distill_i2t', 'distill_t2i', 'distill_t2t')),
    ('temperature exp(scale)', ('logit_scale', 'distill_logit_scale')),
    ('learning rate', ('lr',)),
)


def data_counters(stats: Mapping[str, Any]) -> dict[str, float]:
  """The input pipeline's counters over all hosts, for metrics.jsonl (``TrainIterator.stats()``
  of this host in; a collective with several hosts, so every host calls it at the same steps).

  data/seen and data/skipped: records read and skipped as bad, summed over the hosts;
  data/bad_fraction: their ratio; data/source_missing: samples the source lost before they
  became records (shards cut short; the same figure on every host).
  """
  rows = distributed.allgather_json([int(stats['seen']), int(stats['skipped'])])
  seen, skipped = sum(r[0] for r in rows), sum(r[1] for r in rows)
  return {'data/seen': seen, 'data/skipped': skipped,
          'data/bad_fraction': skipped / max(seen, 1),
          'data/source_missing': int(stats.get('source_missing', 0))}


class RunLog:
  """metrics.jsonl (one JSON object per logged step) and TensorBoard events in ``workdir``.

  ``start_step``: the step the run starts from (a resume: the restored step). Rows that a
  killed run wrote past it are dropped from metrics.jsonl (rewritten atomically) and
  TensorBoard purges its events from ``start_step + 1`` on, so every step appears once.
  """

  def __init__(self, workdir: str, enabled: Optional[bool] = None, start_step: int = 0):
    self.workdir = workdir
    self.enabled = distributed.is_primary() if enabled is None else enabled
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self.dropped_rows = 0
    self._tb = None
    if self.enabled:
      self.dropped_rows = drop_rows_after(self.jsonl_path, start_step)
      from tensorboardX import SummaryWriter
      # The file name has the time in seconds: the suffix keeps a quick resume from
      # overwriting the events of the run it resumes.
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), flush_secs=30,
                               purge_step=start_step + 1,
                               filename_suffix=f'.from{start_step}.{os.getpid()}')

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in values.items() if isinstance(v, numbers.Real)}
    with open(self.jsonl_path, 'a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')
    for name, value in scalars.items():
      self._tb.add_scalar(name if '/' in name else f'train/{name}', value, step)

  def write_config(self, config_dict: Mapping[str, Any]) -> Optional[str]:
    """The resolved config as JSON (every default filled in) and as TensorBoard text."""
    if not self.enabled:
      return None
    path = os.path.join(self.workdir, 'config.json')
    with open(path, 'w') as f:
      json.dump(config_dict, f, indent=2, default=str)
      f.write('\n')
    self._tb.add_text('config', '```\n' + json.dumps(config_dict, indent=2, default=str)
                      + '\n```', 0)
    return path

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def drop_rows_after(jsonl_path: str, step: int) -> int:
  """Removes the rows of steps past ``step`` (a resumed run writes them again); the count.

  The file is rewritten through a temporary file and a rename, so a kill leaves either the
  old or the new file. A last line cut by a kill is dropped too.
  """
  if not os.path.isfile(jsonl_path):
    return 0
  with open(jsonl_path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and row.get('step', 0) <= step:
      kept.append(line if line.endswith('\n') else line + '\n')
  if len(kept) == len(lines):
    return 0
  tmp = jsonl_path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, jsonl_path)
  return len(lines) - len(kept)


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm.tqdm:
  """Steps with rate and ETA; redraws less often when stderr is a log file, not a terminal."""
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                   disable=not enabled, mininterval=0.5 if sys.stderr.isatty() else 30.0,
                   smoothing=0.1)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(jsonl_path: str, png_path: str, title: str = '') -> Optional[str]:
  """Loss, distillation terms, temperatures and learning rate against step, as one PNG."""
  records = read_jsonl(jsonl_path)
  panels = [(name, [k for k in keys if any(k in r for r in records)]) for name, keys in PANELS]
  panels = [(name, keys) for name, keys in panels if keys]
  if not panels:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, (name, keys) in zip(axes[0], panels):
    for key in keys:
      points = [(r['step'], r[key]) for r in records if key in r]
      ax.plot(*zip(*points), label=key, linewidth=1.2, marker='.' if len(points) < 20 else None)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  fig.savefig(png_path, dpi=90)
  plt.close(fig)
  return png_path
