"""The train step compiled for a real TPU slice from a machine without one (``--tpu-topology``).

The step is the one training runs (``train.from_config.build_train_step``: state shardings in
and out, the state donated), lowered on abstract inputs for the slice's devices and compiled
by XLA:TPU from the libtpu wheel, with JAX itself on the CPU backend. The compile runs in a
child process of its own, so that its environment (``JAX_PLATFORMS=cpu``,
``TPU_SKIP_MDS_QUERY=1``) is set before JAX starts there and its memory is returned after.
The report is one device's: XLA's memory analysis against the chip's HBM, XLA's FLOP and
byte estimates, the collectives of the compiled HLO (``hlo.py``) and a roofline estimate of
the step time (``estimate.py``). See docs/aot.md.

  python -m cosmos_jax.bench.aot < spec.json   # the child: {'config', 'target'}
"""

from __future__ import annotations

import importlib.metadata
import itertools
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Optional

import ml_collections

from cosmos_jax import config as config_lib
from cosmos_jax.bench import estimate, hlo, topology
from cosmos_jax.errors import UsageError

# No TPU is opened, so several compiles may share the machine: without the last flag libtpu
# refuses to load while another process holds its lockfile.
CHILD_ENV = {'JAX_PLATFORMS': 'cpu', 'TPU_SKIP_MDS_QUERY': '1', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
# Donated state is both argument and output; alias_bytes says how much of it is shared.
_MEMORY_FIELDS = {'argument': 'argument_size_in_bytes', 'output': 'output_size_in_bytes',
                  'alias': 'alias_size_in_bytes', 'temp': 'temp_size_in_bytes',
                  'code': 'generated_code_size_in_bytes'}
_SIZE = r'([0-9.]+)\s*([KMGT]i?B?|B)?'
_OOM_PATTERNS = (
    # XLA:TPU's two wordings of a step that does not fit.
    re.compile(r'required for HLO temporaries \(' + _SIZE + r'\) exceeds available HBM \('
               + _SIZE + r'\)'),
    re.compile(r'Used ' + _SIZE + r' of ' + _SIZE + r' hbm'),
)
_UNITS = {'': 1, 'B': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def libtpu_requirement() -> str:
  """The libtpu pin of the installed jax's ``tpu`` extra, e.g. 'libtpu==0.0.42.*'."""
  try:
    requires = importlib.metadata.requires('jax') or []
  except importlib.metadata.PackageNotFoundError:
    requires = []
  for req in requires:
    name, _, marker = req.partition(';')
    if name.strip().startswith('libtpu') and 'tpu' in marker:
      return name.strip()
  return 'libtpu'


def check_libtpu() -> None:
  """A UsageError saying how to install libtpu when it is not importable."""
  if importlib.util.find_spec('libtpu') is None:
    jax_version = importlib.metadata.version('jax')
    raise UsageError(
        f"--tpu-topology compiles with XLA:TPU from the libtpu wheel, which is not installed: "
        f"install with pip install -e '.[aot]' (about 0.7 GB; the extra's range is jax 0.10.2's "
        f"pin, and the installed jax {jax_version} pins {libtpu_requirement()!r})")


def parse_oom(message: str) -> Optional[dict[str, int]]:
  """XLA:TPU's out-of-HBM compile error -> {'required_bytes', 'available_bytes'}; else None."""
  if 'RESOURCE_EXHAUSTED' not in message and 'Ran out of memory' not in message:
    return None
  for pattern in _OOM_PATTERNS:
    m = pattern.search(message)
    if m:
      need = float(m.group(1)) * _UNITS[(m.group(2) or '')[:1]]
      have = float(m.group(3)) * _UNITS[(m.group(4) or '')[:1]]
      return {'required_bytes': int(need), 'available_bytes': int(have)}
  return {'required_bytes': 0, 'available_bytes': 0}   # out of memory, sizes not given


def per_device_bytes(stats: Any) -> dict[str, int]:
  """``memory_analysis()`` -> argument/output/alias/temp/code and the total one device holds."""
  out = {k: int(getattr(stats, name, 0) or 0) for k, name in _MEMORY_FIELDS.items()}
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp'] + out['code']
  return out


def cost_figures(cost: Any) -> dict[str, float]:
  """``cost_analysis()`` (a dict, or a list of one on older jax) -> flops and bytes accessed."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {'flops': float(cost.get('flops', 0.0)),
          'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
          'transcendentals': float(cost.get('transcendentals', 0.0))}


def compile_report(config: ml_collections.ConfigDict, target: topology.TpuTarget,
                   hlo_path: Optional[str] = None) -> dict:
  """Compiles the step for ``target`` in this process (JAX on the CPU backend, libtpu here);
  ``hlo_path``: also write the compiled HLO text there."""
  import jax
  from cosmos_jax.bench.build import abstract_inputs
  from cosmos_jax.train import partition
  from cosmos_jax.train.from_config import build_train_step

  devices = topology.target_devices(target)
  shape = partition.resolve_mesh_shape(config.mesh.shape, len(devices))
  report: dict[str, Any] = {
      'topology': target.libtpu_name, 'name': target.name, 'chip': target.chip.name,
      'devices': len(devices), 'mesh': list(shape), 'preset': config.mesh.preset,
      'global_batch': config.batch_size, 'dtype': config.model.dtype,
      'remat': bool(config.model.remat), 'hbm_bytes': target.chip.hbm_bytes}
  mesh = partition.make_mesh(shape, devices=devices)
  partition.check_batch_size(config.batch_size, mesh)
  build = build_train_step(config, mesh)
  state, batch = abstract_inputs(build, config.batch_size)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = build.train_step.lower(state, batch)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      report['compile_s'] = time.perf_counter() - start
      oom = parse_oom(str(e))
      if oom is None:
        raise
      report.update(fits=False, oom=oom, error=_first_line(str(e)))
      return report
  report['compile_s'] = time.perf_counter() - start
  memory = per_device_bytes(compiled.memory_analysis())
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, 'w') as f:
      f.write(text)
  summary, unknown_loops = hlo.collective_summary(text)
  cost = cost_figures(compiled.cost_analysis())
  report.update(per_device_bytes=memory, cost=cost, collectives=summary,
                fits=memory['total'] <= target.chip.hbm_bytes,
                headroom_bytes=target.chip.hbm_bytes - memory['total'],
                headroom=1.0 - memory['total'] / target.chip.hbm_bytes,
                estimate=estimate.step_time(cost, summary, target.chip, config.model.dtype))
  if unknown_loops:
    report['collectives_note'] = (f'{unknown_loops} while loop(s) without a known trip count: '
                                  'their collectives are counted once')
  return report


def _first_line(message: str) -> str:
  lines = [l.strip() for l in message.strip().splitlines() if l.strip()]
  return lines[0][:500] if lines else 'no message'


def report_in_child(config: ml_collections.ConfigDict, target: topology.TpuTarget,
                    timeout_s: Optional[float] = None, hlo_path: Optional[str] = None) -> dict:
  """``compile_report`` in a child process with the AOT environment; failures become
  {'error': ...} rows rather than exceptions, so a search can go on."""
  spec = {'config': config.to_json(), 'target': target.name,
          'hlo_path': os.path.abspath(hlo_path) if hlo_path else None}
  env = {**os.environ, **CHILD_ENV}
  base = {'topology': target.libtpu_name, 'name': target.name, 'devices': target.chips,
          'hbm_bytes': target.chip.hbm_bytes, 'fits': False}
  try:
    proc = subprocess.run([sys.executable, '-m', 'cosmos_jax.bench.aot'], input=json.dumps(spec),
                          capture_output=True, text=True, env=env, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {**base, 'error': f'the compile timed out after {timeout_s} s'}
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    errors = [l for l in proc.stderr.strip().splitlines()
              if re.match(r'\w*(Error|Exception)\b|[\w.]+(Error|Exception):', l)]
    tail = errors[-1:] or proc.stderr.strip().splitlines()[-1:] or ['no output']
    return {**base, 'error': f'the compile process failed: {tail[0][:500]}'}
  return json.loads(lines[-1])


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def fit_changes(config: ml_collections.ConfigDict, devices: int) -> list[dict[str, Any]]:
  """What may make a step fit, mildest first: a larger fsdp axis (the same computation, more
  communication), remat (the same numbers, about a third more compute), bfloat16 matmuls
  (other numbers), then their combinations. Changes the config already has are left out."""
  data, fsdp, model = partition_shape(config, devices)
  single: list[dict[str, Any]] = []
  if data > 1:
    wider = {'mesh.shape': (1, data * fsdp, model)}
    single.append({**wider, 'mesh.preset': 'fsdp'} if config.mesh.preset == 'dp' else wider)
  elif config.mesh.preset == 'dp' and fsdp > 1:
    single.append({'mesh.preset': 'fsdp'})
  if not config.model.remat:
    single.append({'model.remat': True})
  if config.model.dtype != 'bfloat16':
    single.append({'model.dtype': 'bfloat16'})
  changes = []
  for size in range(1, len(single) + 1):   # one change, then pairs, then all three
    for combo in itertools.combinations(single, size):
      changes.append({k: v for change in combo for k, v in change.items()})
  return changes


def describe_change(change: dict[str, Any]) -> str:
  return ' '.join(f'--config.{k}={_literal(v)}' for k, v in change.items())


def _literal(value: Any) -> str:
  return ','.join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def fit_note(report: dict, config: ml_collections.ConfigDict) -> str:
  """For a step that does not fit: which changes act on the part that is too large."""
  hints = []
  data, fsdp, model = partition_shape(config, report['devices'])
  if data > 1 or config.mesh.preset == 'dp':
    hints.append(f'a larger fsdp axis (--config.mesh.shape=1,{data * fsdp},{model} with the '
                 'fsdp preset) divides the state and the optimiser by more devices')
  if not config.model.remat:
    hints.append('model.remat=True keeps one activation per block instead of all')
  if config.model.dtype != 'bfloat16':
    hints.append('model.dtype=bfloat16 halves the matmul activations')
  if not hints:
    return 'already remat, bfloat16 and fully fsdp: a smaller global batch or a larger slice'
  return '; '.join(hints) + ' (--search compiles them to see which fits)'


def partition_shape(config: ml_collections.ConfigDict, devices: int) -> tuple[int, ...]:
  from cosmos_jax.train import partition
  return partition.resolve_mesh_shape(config.mesh.shape, devices)


def run(config: ml_collections.ConfigDict, topology_name: str, *, search: bool = False,
        out_path: Optional[str] = None, timeout_s: Optional[float] = None,
        hlo_path: Optional[str] = None) -> dict[str, Any]:
  """The AOT report of ``config`` on ``topology_name`` ({'aot': ...}); with ``search``, also
  the changes tried until one fits ({'search': [...], 'first_fit': ...}). ``hlo_path``: the
  compiled HLO text of the config as given is written there."""
  target = topology.parse_target(topology_name)
  config_lib.validate(config)
  check_libtpu()
  partition_shape(config, target.chips)   # a mesh that cannot cover the slice fails here
  results: dict[str, Any] = {'date': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                             'versions': versions(),
                             'config': {'variant': config.model.variant,
                                        'cosmos': config.model.cosmos}}
  report = _with_model_flops(report_in_child(config, target, timeout_s, hlo_path), config)
  results['aot'] = report
  if report.get('oom') or 'per_device_bytes' in report and not report['fits']:
    report['note'] = fit_note(report, config)
  if search and not report.get('fits'):
    results['search'], results['first_fit'] = [], None
    for change in fit_changes(config, target.chips):
      tried = ml_collections.ConfigDict(config.to_dict())
      for field, value in change.items():
        set_field(tried, field, value)
      row = _with_model_flops(report_in_child(tried, target, timeout_s), tried)
      row['change'] = describe_change(change)
      results['search'].append(row)
      if row.get('fits'):
        results['first_fit'] = row['change']
        break
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, 'w') as f:
      json.dump(results, f, indent=2)
  return results


def _with_model_flops(report: dict, config: ml_collections.ConfigDict) -> dict:
  """Adds the analytic FLOPs one device executes (``flops.py``), a check on XLA's count."""
  from cosmos_jax.bench import flops
  from cosmos_jax.train.from_config import model_config
  executed = flops.train_step_flops(model_config(config), flops.step_shape(config))['executed']
  report['model_flops_per_device'] = executed / report['devices']
  return report


def versions() -> dict[str, str]:
  out = {}
  for package in ('jax', 'jaxlib', 'libtpu', 'flax'):
    try:
      out[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      out[package] = 'not installed'
  return out


def _main() -> None:
  spec = json.loads(sys.stdin.read())
  config = ml_collections.ConfigDict(json.loads(spec['config']))
  report = compile_report(config, topology.parse_target(spec['target']), spec.get('hlo_path'))
  print(json.dumps(report))


if __name__ == '__main__':
  _main()
