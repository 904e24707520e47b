"""``cosmos-jax bench``: every figure of one config on this machine, as a dict and as JSON.

Sections, each skippable: 'train' (step time, compile time, XLA's FLOP count), 'peak' (the
measured matmul peak, taken before and after the step so a busy machine is seen), 'memory'
(per-device bytes of the compiled step for a list of meshes), 'data' (pipeline samples/s)
and 'eval' (image encoding). Model FLOPs are analytic and always reported.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from cosmos_jax import config as config_lib
from cosmos_jax.xla_cpu import host as xla_cpu_host
from cosmos_jax.bench import flops as flops_lib
from cosmos_jax.bench import memory as memory_lib
from cosmos_jax.bench.peak import matmul_peak
from cosmos_jax.bench.timing import bench_data, bench_eval, bench_train_step
from cosmos_jax.train import distributed, partition
from cosmos_jax.train.from_config import model_config

SECTIONS = ('train', 'peak', 'memory', 'data', 'eval')


def cpu_model() -> Optional[str]:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return None


def load_average() -> Optional[list[float]]:
  """1, 5 and 15 minute load: timings on a shared machine mean little without it."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def machine_info() -> dict[str, Any]:
  devices = jax.devices()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return {'backend': jax.default_backend(), 'device_kind': devices[0].device_kind,
          'device_count': len(devices), 'process_count': jax.process_count(),
          'cpu_model': cpu_model(), 'cpu_cores': cores, 'jax_version': jax.__version__,
          'host_huge_pages': xla_cpu_host.huge_pages_active(),
          'host_malloc_arenas_kept': xla_cpu_host.arena_tuning_active(),
          'host_block_cache': xla_cpu_host.block_cache_active()}


def _peak(config: ml_collections.ConfigDict, mesh, repeats: int) -> dict[str, float]:
  dtypes = ['float32'] + ([config.model.dtype] if config.model.dtype != 'float32' else [])
  return {d: matmul_peak(jnp.dtype(d), mesh=mesh, repeats=repeats)['flops_per_s']
          for d in dtypes}


def _official(repo: str, config: ml_collections.ConfigDict, repeats: int) -> dict[str, Any]:
  try:   # written separately; it may be missing from an install
    from cosmos_jax.bench import official
  except ImportError as e:
    return {'official_error': f'cosmos_jax.bench.official is not available ({e})'}
  try:
    return official.time_official_step(repo, config, repeats)
  except (FileNotFoundError, RuntimeError) as e:   # keep this run's own figures
    return {'official_error': str(e)}


def run(config: ml_collections.ConfigDict, out_path: Optional[str] = None, *, repeats: int = 5,
        data_batches: int = 10, meshes: Optional[Sequence[Sequence[int]]] = None,
        skip: Sequence[str] = (), per_device_batch: Optional[int] = None,
        official_repo: Optional[str] = None) -> dict[str, Any]:
  """Runs the sections not in ``skip``; writes the results as JSON to ``out_path`` if given.

  ``meshes`` lists the shapes of the memory table (default: the config's mesh);
  ``per_device_batch`` sizes each of their global batches (default: the config's batch).
  ``official_repo``: also time the official PyTorch step from that checkout.
  """
  config_lib.validate(config)
  unknown = set(skip) - set(SECTIONS)
  if unknown:
    raise ValueError(f'unknown bench sections {sorted(unknown)}; known: {", ".join(SECTIONS)}')
  if official_repo and not os.path.isdir(official_repo):
    raise FileNotFoundError(f'official COSMOS checkout not found: {official_repo}')
  distributed.initialize()
  mcfg, d = model_config(config), config.data
  shape = flops_lib.step_shape(config)
  step_flops = flops_lib.train_step_flops(mcfg, shape)
  results: dict[str, Any] = {
      'config': {'variant': config.model.variant, 'cosmos': mcfg.cosmos,
                 'batch_size': config.batch_size, 'global_size': d.global_size,
                 'local_size': d.local_size, 'num_local': d.num_local,
                 'num_captions': shape.num_captions, 'mesh': list(config.mesh.shape),
                 'preset': config.mesh.preset, 'dtype': config.model.dtype,
                 'remat': config.model.remat},
      'date': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      'machine': machine_info(),
      'load_average': {'start': load_average()},
      'model_flops_per_step': step_flops['total'],
      'executed_flops_per_step': step_flops['executed'],
      'flops': step_flops,
  }
  # Only the timed sections need the config's mesh to fit this machine.
  mesh = partition.make_mesh(config.mesh.shape) if {'peak', 'train'} - set(skip) else None
  peaks = []
  if 'peak' not in skip:
    peaks.append(_peak(config, mesh, repeats))
  known_memory = {}
  if 'train' not in skip:
    results.update(bench_train_step(config, repeats))
    row = results.pop('memory_row')
    if memory_lib.global_batch(config, row['mesh'], per_device_batch) == config.batch_size:
      known_memory[tuple(row['mesh'])] = row
    # What the step multiplies, not the reference's count: skipped work must not flatter it.
    results['achieved_flops_per_s'] = step_flops['executed'] / results['train_step_s']
    if 'peak' not in skip:
      peaks.append(_peak(config, mesh, repeats))
  if peaks:
    # The higher of the two: a load spike during one measurement must not flatter the ratio.
    results['peak_flops_per_s'] = {k: max(p[k] for p in peaks) for k in peaks[0]}
    if 'achieved_flops_per_s' in results:
      peak = results['peak_flops_per_s'][config.model.dtype]
      results['fraction_of_peak'] = results['achieved_flops_per_s'] / peak
      # MFU's convention: the model's FLOPs (as the reference computes them) over the step
      # time, the same numerator as the official step's fraction below.
      results['model_fraction_of_peak'] = step_flops['total'] / results['train_step_s'] / peak
  if 'memory' not in skip:
    rows = memory_lib.memory_table(config, meshes or [tuple(config.mesh.shape)],
                                   per_device_batch=per_device_batch, known=known_memory)
    results['memory'] = rows
    if any(r.get('backend', 'cpu') == 'cpu' for r in rows):
      results['memory_note'] = memory_lib.CPU_NOTE
  if 'data' not in skip:
    results.update(bench_data(config, data_batches))
  if 'eval' not in skip:
    results.update(bench_eval(config, repeats))
  if official_repo:
    results.update(_official(official_repo, config, repeats))
    if 'official_step_s' in results and 'train_step_s' in results:
      results['speedup_vs_official'] = results['official_step_s'] / results['train_step_s']
    if 'official_step_s' in results and results.get('peak_flops_per_s'):
      # The reference computes every block in full: its model FLOPs are all executed. Both
      # steps against the same peak, and against torch's own matmul rate (the faster library
      # on some CPUs), so neither figure flatters one side.
      official = step_flops['total'] / results['official_step_s']
      results['official_fraction_of_peak'] = official / results['peak_flops_per_s']['float32']
      torch_peak = results.get('official_matmul_flops_per_s')
      if torch_peak and 'achieved_flops_per_s' in results:
        results['fraction_of_torch_peak'] = results['achieved_flops_per_s'] / torch_peak
        results['official_fraction_of_torch_peak'] = official / torch_peak
  results['load_average']['end'] = load_average()
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, 'w') as f:
      json.dump(results, f, indent=2)
  return results
