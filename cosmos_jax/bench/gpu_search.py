"""The GPU benchmark's batch search and its cross-kernel parity check.

``search_batch`` finds the largest batch that runs by doubling (with jumps where the compiled
memory says a larger power still fits) and halving after an out-of-memory; ``parity``
compares the fingerprints (loss and gradients, ``gpu_trial``) of two attention kernels.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import numpy as np

# Parity of two attention kernels in bfloat16: relative errors of the loss and of all
# gradients together (L2). bf16 keeps 8 bits of mantissa (0.4%); a different kernel rounds
# in a different order through 12 blocks and their backward.
PARITY_TOLERANCE = {'loss': 1e-2, 'grads': 5e-2}


# A bigger batch compiles in about the same time (compiles dominate a trial) and runs its few
# timed steps longer: the next trial is taken to last this much longer than the last one.
MARGIN = 1.25


def search_batch(run: Callable[[int], dict], first: int, cap: int, deadline: float, *,
                 predict: Optional[Callable[[dict], Optional[int]]] = None,
                 estimate_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
  """The largest batch of the form ``first * 2**k`` (up to ``cap``) that runs.

  Doubles after each trial that ran, or jumps further where ``predict`` (from that trial's
  compiled memory) says a larger power still fits; after an out-of-memory it halves until
  one runs. It stops once a batch ran and its double ran out of memory ('oom'), at the cap
  ('cap'), at a failure other than memory ('error'), or when the last trial's duration with
  a margin for the bigger batch would pass ``deadline`` ('budget'); ``estimate_s`` stands in
  for it before the first trial (e.g. another kernel's last trial).

  Returns {'trials': [...], 'best': the largest trial that ran or None, 'stopped_by'}.
  """
  trials: list[dict] = []
  best: Optional[dict] = None
  failed_at: Optional[int] = None   # the smallest batch that ran out of memory
  batch, last_s = first, estimate_s
  while True:
    if batch > cap:
      stopped = 'cap'
      break
    if clock() + MARGIN * last_s > deadline:
      stopped = 'budget'
      break
    result = run(batch)
    trials.append(result)
    last_s = result.get('wall_s', 0.0)
    if result['ok']:
      best = result
      jump = predict(result) if predict else None
      batch = max(2 * batch, jump or 0)
      if failed_at is not None and batch >= failed_at:
        stopped = 'oom'
        break
    elif result['oom']:
      failed_at = batch
      batch //= 2
      if batch < 1 or (best is not None and batch <= best['batch']):
        stopped = 'oom'
        break
    else:
      stopped = 'error'
      break
  return {'trials': trials, 'best': best, 'stopped_by': stopped}


def memory_prediction(cap: int, fraction: float = 0.9) -> Callable[[dict], Optional[int]]:
  """``predict`` for ``search_batch``: the largest doubling of a trial's batch whose memory,
  with the temporaries scaled linearly from the trial's compiled step, stays within
  ``fraction`` of the device's allocator limit. None where the device reports no limit."""

  def predict(trial: dict) -> Optional[int]:
    limit, mem = trial.get('bytes_limit'), trial.get('compiled_memory') or {}
    if not limit or not mem.get('temp_bytes'):
      return None
    fixed = mem['peak_bytes'] - mem['temp_bytes']
    per_sample = mem['temp_bytes'] / trial['batch']
    batch = trial['batch']
    while 2 * batch <= cap and fixed + per_sample * 2 * batch <= fraction * limit:
      batch *= 2
    return batch
  return predict


def relative_errors(a_path: str, b_path: str) -> dict[str, Any]:
  """Loss and gradient errors of fingerprint ``a`` against the reference ``b``."""
  with np.load(a_path) as a, np.load(b_path) as b:
    if set(a.files) != set(b.files):
      raise ValueError(f'fingerprints differ in their leaves: {sorted(set(a.files) ^ set(b.files))[:5]}')
    loss_a, loss_b = float(a['__loss__']), float(b['__loss__'])
    diff_sq = ref_sq = 0.0
    worst_name, worst = None, -1.0
    for name in sorted(a.files):
      if name == '__loss__':
        continue
      x, y = a[name].astype(np.float64), b[name].astype(np.float64)
      d, r = float(np.sum((x - y) ** 2)), float(np.sum(y ** 2))
      diff_sq, ref_sq = diff_sq + d, ref_sq + r
      leaf = math.sqrt(d / r) if r > 0 else (0.0 if d == 0 else math.inf)
      if leaf > worst:
        worst_name, worst = name, leaf
  return {'loss': loss_a, 'reference_loss': loss_b,
          'loss_rel_err': abs(loss_a - loss_b) / max(abs(loss_b), 1e-30),
          'grads_rel_err': math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.inf,
          'worst_leaf': worst_name, 'worst_leaf_rel_err': worst}


def parity(reference: dict[int, str], other: dict[int, str]) -> Optional[dict[str, Any]]:
  """At the largest batch both have a fingerprint for; None where they share none."""
  common = sorted(set(reference) & set(other))
  if not common:
    return None
  batch = common[-1]
  errors = relative_errors(other[batch], reference[batch])
  errors['batch'] = batch
  errors['tolerance'] = dict(PARITY_TOLERANCE)
  errors['ok'] = (errors['loss_rel_err'] <= PARITY_TOLERANCE['loss']
                  and errors['grads_rel_err'] <= PARITY_TOLERANCE['grads'])
  return errors
