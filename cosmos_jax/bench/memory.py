"""Per-device memory of the compiled train step for a list of mesh shapes, allocating nothing.

Each mesh compiles the step as training jits it (state shardings, donated state) on
abstract inputs, and XLA's ``memory_analysis()`` of the executable gives the bytes one
device holds: arguments, outputs, temporaries and generated code. Meshes with more devices
than this process has are compiled in a child process with that many forced host (CPU)
devices, so a pod's layout can be checked from a laptop. The figures are those of the CPU
compiler there: an estimate for GPU and TPU, whose fusion, layouts and collectives differ.

  python -m cosmos_jax.bench.memory < spec.json   # the child: {'config', 'meshes', ...}
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from typing import Any, Optional, Sequence

import jax
import ml_collections

from cosmos_jax.bench.build import abstract_inputs
from cosmos_jax.train.from_config import build_train_step
from cosmos_jax.train import partition

_FIELDS = {'argument_bytes': 'argument_size_in_bytes', 'output_bytes': 'output_size_in_bytes',
           'alias_bytes': 'alias_size_in_bytes', 'temp_bytes': 'temp_size_in_bytes',
           'code_bytes': 'generated_code_size_in_bytes'}
CPU_NOTE = ('compiled by the CPU backend: an estimate for GPU/TPU (fusion, layouts and '
            'collectives differ)')


def parse_mesh(text: str) -> tuple[int, int, int]:
  """'8,1,1' (or '8x1x1') -> (8, 1, 1); the axes are ('data', 'fsdp', 'model')."""
  parts = [p for p in re.split(r'[,x]', text.strip()) if p]
  if len(parts) != len(partition.AXES) or not all(re.fullmatch(r'-?\d+', p) for p in parts):
    raise ValueError(f'mesh {text!r}: give {len(partition.AXES)} integers for '
                     f'{",".join(partition.AXES)}, e.g. 8,1,1')
  shape = tuple(int(p) for p in parts)
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh {text!r}: sizes must be positive (or one -1 for the local rest)')
  return shape


def global_batch(config: ml_collections.ConfigDict, shape: Sequence[int],
                 per_device_batch: Optional[int]) -> int:
  """The config's global batch, or ``per_device_batch`` times the data-parallel size."""
  if per_device_batch:
    return per_device_batch * shape[0] * shape[1]
  return config.batch_size


def compiled_memory(config: ml_collections.ConfigDict, shape: Sequence[int],
                    per_device_batch: Optional[int] = None) -> dict[str, Any]:
  """One row: the memory of one device for ``shape`` on this process's first devices."""
  shape = tuple(shape)
  row: dict[str, Any] = {'mesh': list(shape), 'devices': math.prod(shape),
                         'backend': jax.default_backend()}
  try:
    mesh = partition.make_mesh(shape, jax.devices()[:math.prod(shape)])
    batch_size = global_batch(config, shape, per_device_batch)
    row['global_batch'] = batch_size
    partition.check_batch_size(batch_size, mesh)
    build = build_train_step(config, mesh)
    state, batch = abstract_inputs(build, batch_size)
    with jax.set_mesh(mesh):
      stats = build.train_step.lower(state, batch).compile().memory_analysis()
  except (ValueError, jax.errors.JaxRuntimeError) as e:   # e.g. a batch the mesh cannot split
    row['error'] = str(e).strip().splitlines()[0]
    return row
  return add_stats(row, stats)


def add_stats(row: dict[str, Any], stats: Any) -> dict[str, Any]:
  """Fills ``row`` from a ``memory_analysis()`` result (None on backends without one)."""
  if stats is None:
    row['error'] = f'{jax.default_backend()} gives no memory analysis'
    return row
  row.update({k: int(getattr(stats, name, 0) or 0) for k, name in _FIELDS.items()})
  # Donated state is both argument and output; count it once.
  row['peak_bytes'] = (row['argument_bytes'] + row['output_bytes'] - row['alias_bytes']
                       + row['temp_bytes'] + row['code_bytes'])
  return row


def cpu_devices_env(num_devices: int) -> dict[str, str]:
  """os.environ for a child process on ``num_devices`` (fake) CPU devices: the device count
  replaced in XLA_FLAGS, the caller's other XLA flags kept."""
  env = dict(os.environ)
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={num_devices}'.strip()
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _in_child(config: ml_collections.ConfigDict, shapes: list[tuple[int, ...]],
              per_device_batch: Optional[int], timeout_s: Optional[float]) -> list[dict]:
  spec = {'config': config.to_json(), 'meshes': [list(s) for s in shapes],
          'per_device_batch': per_device_batch}
  n = max(math.prod(s) for s in shapes)
  try:
    proc = subprocess.run([sys.executable, '-m', 'cosmos_jax.bench.memory'],
                          input=json.dumps(spec), capture_output=True, text=True,
                          env=cpu_devices_env(n), timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return [{'mesh': list(s), 'devices': math.prod(s),
             'error': f'compile in a {n}-device child process timed out after {timeout_s} s'}
            for s in shapes]
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    tail = proc.stderr.strip().splitlines()[-1:] or ['no output']
    return [{'mesh': list(s), 'devices': math.prod(s),
             'error': f'{n}-device child process failed: {tail[0]}'} for s in shapes]
  return json.loads(lines[-1])


def memory_table(config: ml_collections.ConfigDict, shapes: Sequence[Sequence[int]], *,
                 per_device_batch: Optional[int] = None, timeout_s: Optional[float] = None,
                 known: Optional[dict[tuple[int, ...], dict]] = None) -> list[dict[str, Any]]:
  """Rows in the order of ``shapes``; a -1 takes this process's devices (as config.mesh).

  ``known``: rows already measured (the timed step's executable), reused, not recompiled.
  """
  known = dict(known or {})
  local = jax.device_count()
  resolved: list[tuple[int, ...] | dict] = []
  for shape in shapes:
    try:
      resolved.append(partition.resolve_mesh_shape(shape, local) if -1 in shape
                      else tuple(int(s) for s in shape))
    except ValueError as e:
      resolved.append({'mesh': list(shape), 'error': str(e)})
  # Compiling here needs the devices and a single process (its devices are all local).
  here = lambda s: math.prod(s) <= local and jax.process_count() == 1
  far = list(dict.fromkeys(s for s in resolved
                            if isinstance(s, tuple) and s not in known and not here(s)))
  if far:
    known.update(zip(far, _in_child(config, far, per_device_batch, timeout_s)))
  rows = []
  for s in resolved:
    if isinstance(s, dict):
      rows.append(s)
    else:
      if s not in known:
        known[s] = compiled_memory(config, s, per_device_batch)
      rows.append(known[s])
  return rows


def _main() -> None:
  spec = json.loads(sys.stdin.read())
  config = ml_collections.ConfigDict(json.loads(spec['config']))
  rows = [compiled_memory(config, s, spec.get('per_device_batch')) for s in spec['meshes']]
  print(json.dumps(rows))


if __name__ == '__main__':
  _main()
