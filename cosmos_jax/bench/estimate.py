"""A roofline estimate of a compiled step's time on a TPU chip, from XLA's cost analysis.

An estimate, not a measurement: the step takes at least its FLOPs at the chip's datasheet
peak and at least its HBM bytes at the datasheet bandwidth; the larger of the two is the
estimate (perfect overlap, every op at peak). Collectives are not in it: their bytes per step
are reported beside it, and on the ICI they overlap with compute when XLA schedules them so.
"""

from __future__ import annotations

from typing import Any

from cosmos_jax.bench.topology import ChipSpec


def step_time(cost: dict[str, float], collectives: dict[str, dict[str, int]], chip: ChipSpec,
              dtype: str) -> dict[str, Any]:
  """{'step_s', 'compute_s', 'memory_s', 'bound', 'peak_flops', 'collective_bytes'}."""
  peak = chip.bf16_flops if dtype == 'bfloat16' else chip.fp32_flops
  compute_s = cost['flops'] / peak
  memory_s = cost['bytes_accessed'] / chip.hbm_bytes_per_s
  return {'step_s': max(compute_s, memory_s), 'compute_s': compute_s, 'memory_s': memory_s,
          'bound': 'compute' if compute_s >= memory_s else 'memory', 'peak_flops': peak,
          'hbm_bytes_per_s': chip.hbm_bytes_per_s,
          'collective_bytes': sum(c['bytes'] for c in collectives.values()),
          'label': 'estimate: max(FLOPs / peak, HBM bytes / bandwidth) per device, '
                   'collectives excluded'}
