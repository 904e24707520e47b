"""Benchmarks of a run config on this machine: ``cosmos-jax bench``.

  flops.py   model FLOPs of one train step, counted analytically
  peak.py    the measured matmul peak (what "fraction of peak" divides by)
  timing.py  train step, data pipeline and evaluation throughput
  memory.py  per-device memory of the compiled step for a list of meshes
  runner.py  all of it for one config, as a dict and JSON; table.py prints it
  official.py (optional) the official PyTorch step, timed beside ours
"""

from cosmos_jax.bench.runner import SECTIONS, run
from cosmos_jax.bench.table import format_table
from cosmos_jax.bench.timing import bench_data, bench_eval, bench_train_step

__all__ = ['SECTIONS', 'bench_data', 'bench_eval', 'bench_train_step', 'format_table', 'run']
