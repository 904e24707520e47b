"""The one-GPU benchmark: the COSMOS step at the largest batch that fits, per attention kernel.

  python -m cosmos_jax.bench.gpu --out OUT_DIR [--official-repo PATH]   (launch/gpu_bench.sh)

For each attention implementation (``model.attention``; the first is the reference) the
train step of the config (default: the ViT-B/16 Merged-30M recipe in bfloat16) runs on a
one-device mesh at per-device batches 32, 64, 128, ... until one runs out of memory at
compile or run, the cap is reached, or the time budget would be overrun (``gpu_search``;
powers that the compiled memory of a batch that ran says still fit are skipped, since a
larger one is tried instead). The others start at the reference's largest batch (up from
there, or down if it does not fit): the same figures from fewer compiles. Reported per trial: step time, samples/s, compile time, the device's peak
memory; per implementation, at its largest batch: MFU against the GPU's datasheet bf16 peak
and against the matmul peak measured here (``peak.py``), both from the analytic model FLOPs
(``flops.py``); a parity check of each implementation against the reference (loss and
gradients from the same parameters and batch, relative errors against a bf16 tolerance);
and, given a checkout, the official PyTorch step on the same GPU (``official.py``), run
first so that JAX does not hold the GPU's memory meanwhile. Everything goes into
``OUT_DIR/gpu_bench.json``; a short table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional, Sequence

import ml_collections

from cosmos_jax import config as config_lib
from cosmos_jax import config_cli
from cosmos_jax.bench import flops as flops_lib
from cosmos_jax.bench import gpu_trial
from cosmos_jax.bench.gpu_search import memory_prediction, parity, search_batch
from cosmos_jax.bench.table import si
from cosmos_jax.train.from_config import model_config

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs',
                              'merged30m_vitb16.py')
RESULT_FILE = 'gpu_bench.json'
GIB = 2 ** 30

# Dense bf16 tensor-core peaks (FLOP/s), matched on the device kind JAX reports (the CUDA
# device name), first match wins. NVIDIA's datasheets quote bf16 "with sparsity": the dense
# figure is half of it. H100 SXM 1,979 and H100 PCIe 1,513 TFLOPS sparse: the H100 datasheet
# (nvidia.com/en-us/data-center/h100/); H200 (SXM) 1,979: the H200 datasheet
# (nvidia.com/en-us/data-center/h200/); A100 312 dense (624 sparse), SXM and PCIe alike: the
# A100 datasheet (nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
# nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf). NVL boards have lower clocks and are
# left out rather than guessed (pass --peak-tflops).
DATASHEET_BF16_DENSE = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12),
                        ('A100', 312e12))


def datasheet_peak(device_kind: str) -> Optional[float]:
  """The dense bf16 peak of a GPU from its device kind, or None where the table has none."""
  if 'NVL' in device_kind:
    return None
  for name, peak in DATASHEET_BF16_DENSE:
    if name in device_kind:
      return peak
  return None


def bench_config(spec: str = DEFAULT_CONFIG, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The recipe in bfloat16 on one device; ``--config.x=y`` overrides come last."""
  config = config_cli.load_config_file(spec)
  config.model.dtype = 'bfloat16'
  config.mesh.shape = (1, 1, 1)
  config_cli.apply_overrides(config, overrides)
  config.mesh.shape = (1, 1, 1)
  config_lib.validate(config)
  return config


def utilisation(config: ml_collections.ConfigDict, trial: dict[str, Any],
                datasheet: Optional[float], measured: Optional[float]) -> dict[str, Any]:
  """Model FLOPs (MFU's numerator) and executed FLOPs of one trial, over each peak."""
  shape = dataclasses.replace(flops_lib.step_shape(config), batch=trial['batch'])
  counts = flops_lib.train_step_flops(model_config(config), shape)
  out = {'model_flops_per_step': counts['total'], 'executed_flops_per_step': counts['executed'],
         'model_flops_per_s': counts['total'] / trial['step_s']}
  if datasheet:
    out['mfu_datasheet'] = out['model_flops_per_s'] / datasheet
  if measured:
    out['mfu_measured_peak'] = out['model_flops_per_s'] / measured
    out['executed_fraction_of_measured_peak'] = counts['executed'] / trial['step_s'] / measured
  return out


def _official(repo: str, config: ml_collections.ConfigDict, batch: int,
              repeats: int) -> dict[str, Any]:
  """The official step at ``batch`` on this GPU, where ``official.py`` can put it there."""
  from cosmos_jax.bench import official
  params = inspect.signature(official.time_official_step).parameters
  if 'device' not in params:
    return {'official_error': 'cosmos_jax.bench.official times the official step on the CPU '
                              'only (time_official_step has no device argument)'}
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = batch
  kwargs = {'device': 'cuda'}
  if 'precision' in params:
    kwargs['precision'] = 'amp_bf16'   # their bf16 autocast, the nearest to ours
  try:
    out = official.time_official_step(repo, config, repeats, **kwargs)
  except Exception as e:   # their step failing must not cost the rest of the figures
    return {'official_error': f'{type(e).__name__}: {str(e).strip()[-2000:]}'}
  out['official_batch'] = batch
  commit_file = os.path.join(repo, 'COMMIT')   # a copy staged by launch/gpu_bench.sh fetch
  if not out.get('official_commit') and os.path.isfile(commit_file):
    with open(commit_file) as f:
      out['official_commit'] = f.read().strip() or None
  return out


def run(out_dir: str, *, config: Optional[ml_collections.ConfigDict] = None,
        attention: Sequence[str] = ('xla', 'cudnn'), start: int = 32, cap: int = 4096,
        repeats: int = 5, budget_s: float = 300.0, official_repo: Optional[str] = None,
        in_process: Optional[bool] = None, peak_size: Optional[int] = None,
        peak_tflops: Optional[float] = None) -> dict[str, Any]:
  """Every figure of the benchmark as a dict, also written to ``out_dir/gpu_bench.json``.

  ``in_process``: run the trials in this process (default: only on a machine without a
  GPU, where there is no allocator peak to isolate). ``peak_tflops`` replaces the datasheet
  table's peak; ``peak_size`` the matmul size of the measured peak.
  """
  if not attention:
    raise ValueError('give at least one attention implementation')
  unknown = [a for a in attention if a not in config_lib.ATTENTION_IMPLS]
  if unknown:
    raise ValueError(f'unknown attention implementations {unknown}; known: '
                     f'{", ".join(config_lib.ATTENTION_IMPLS)}')
  if start < 1 or cap < start:
    raise ValueError(f'need 1 <= start <= cap, got start={start}, cap={cap}')
  config = config if config is not None else bench_config()
  if in_process is None:
    in_process = not _has_gpu()
  if official_repo and not os.path.isdir(official_repo):
    raise FileNotFoundError(f'official COSMOS checkout not found: {official_repo}')
  os.makedirs(out_dir, exist_ok=True)
  began = time.monotonic()
  results: dict[str, Any] = {
      'date': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      'config': {'variant': config.model.variant, 'dtype': config.model.dtype,
                 'remat': config.model.remat, 'cosmos': config.model.cosmos,
                 'global_size': config.data.global_size, 'local_size': config.data.local_size,
                 'num_local': config.data.num_local, 'mesh': [1, 1, 1]},
      'search': {'start': start, 'cap': cap, 'budget_s': budget_s, 'in_process': in_process,
                 'reference': attention[0]},
  }
  if official_repo:   # first: the GPU is all theirs while no JAX process holds it
    results['official'] = _official(official_repo, config, start, repeats)
  scratch = tempfile.mkdtemp(prefix='cosmos_gpu_bench_')
  try:
    # The budget is the trials' alone: compiles dominate it, and the official step's time
    # depends on their code, not on ours.
    impls = _search_all(config, attention, start, cap, repeats, time.monotonic(), budget_s,
                        in_process, scratch)
    results['attention'] = {name: {k: v for k, v in r.items() if k != 'fingerprints'}
                            for name, r in impls.items()}
    reference = impls[attention[0]]['fingerprints']
    results['parity'] = {name: parity(reference, impls[name]['fingerprints'])
                         for name in attention[1:]}
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  results['device'] = _device_info(results['attention'])
  kind = results['device'].get('device_kind') or ''
  datasheet = peak_tflops * 1e12 if peak_tflops else datasheet_peak(kind)
  results['device']['datasheet_bf16_flops_per_s'] = datasheet
  results['device']['datasheet_source'] = 'given' if peak_tflops else ('table' if datasheet else None)
  _write(out_dir, results)   # the trials' figures are kept even if what follows fails
  results['measured_peak'] = _measured_peak(config, peak_size)
  measured = results['measured_peak'].get('flops_per_s')
  for name, r in results['attention'].items():
    if r['best']:
      r['best'].update(utilisation(config, r['best'], datasheet, measured))
  official = results.get('official', {})
  ours = _trial_at(results['attention'][attention[0]], start)
  if official.get('official_step_s') and ours:
    official['speedup_of_ours_at_same_batch'] = official['official_step_s'] / ours['step_s']
  results['total_s'] = time.monotonic() - began
  _write(out_dir, results)
  return results


def _write(out_dir: str, results: dict[str, Any]) -> None:
  with open(os.path.join(out_dir, RESULT_FILE), 'w') as f:
    json.dump(results, f, indent=2)


# The reference's search may use this share of the budget when other kernels follow: each of
# them needs a trial or two at the batch the reference found.
REFERENCE_SHARE = 0.6


def _search_all(config, attention, start, cap, repeats, began, budget_s, in_process,
                scratch) -> dict[str, dict]:
  impls: dict[str, dict] = {}
  last_s = 0.0
  for i, name in enumerate(attention):
    share = REFERENCE_SHARE if i == 0 and len(attention) > 1 else 1.0
    deadline = began + share * budget_s
    fingerprints: dict[int, str] = {}
    wanted = None if i == 0 else set(impls[attention[0]]['fingerprints'])

    def one(batch: int, name=name, fingerprints=fingerprints, wanted=wanted) -> dict:
      # A trial that started in time may finish past its share, not past the whole budget.
      timeout_s = max(began + budget_s - time.monotonic(), 0.0) + 60.0
      path = None
      if wanted is None or batch in wanted:
        path = os.path.join(scratch, f'{name}_{batch}.npz')
      spec = gpu_trial.trial_spec(config, name, batch, repeats, path)
      if in_process:
        result = gpu_trial.run_trial(spec)
      else:
        result = gpu_trial.run_in_subprocess(spec, timeout_s,
                                             cache_dir=os.path.join(scratch, 'xla_cache'))
      if result['ok'] and path:
        fingerprints[batch] = path
      result.pop('fingerprint_path', None)
      return result

    reference_best = impls[attention[0]]['best'] if i else None
    first = reference_best['batch'] if reference_best else start
    found = search_batch(one, first, cap, deadline, predict=memory_prediction(cap),
                         estimate_s=last_s)
    if found['trials']:
      last_s = found['trials'][-1].get('wall_s', 0.0)
    found['fingerprints'] = fingerprints
    impls[name] = found
  return impls


def _trial_at(impl: dict[str, Any], batch: int) -> Optional[dict[str, Any]]:
  return next((t for t in impl['trials'] if t['ok'] and t['batch'] == batch), None)


def _has_gpu() -> bool:
  """From the driver's device file, not from JAX: asking JAX would make this process take
  GPU memory before the trials' processes need it."""
  return os.path.exists('/dev/nvidiactl')


def _device_info(impls: dict[str, Any]) -> dict[str, Any]:
  trials = [t for r in impls.values() for t in r['trials'] if t.get('device_kind')]
  if not trials:
    return {}
  t = trials[0]
  return {'device_kind': t['device_kind'], 'platform': t['platform'],
          'bytes_limit': t.get('bytes_limit'), 'versions': t.get('versions')}


def _measured_peak(config: ml_collections.ConfigDict, size: Optional[int]) -> dict[str, Any]:
  """After the trials: only now may this process take the GPU."""
  import jax
  import jax.numpy as jnp
  from cosmos_jax.bench.peak import matmul_peak
  from cosmos_jax.train import partition
  try:
    mesh = partition.make_mesh((1, 1, 1), jax.devices()[:1])
    return matmul_peak(jnp.dtype(config.model.dtype), size=size, mesh=mesh)
  except Exception as e:   # reported; the MFU against it is then left out
    return {'flops_per_s': None, 'error': f'{type(e).__name__}: {e}'.splitlines()[0]}


def _si(value: Optional[float]) -> str:
  return si(value) if value else '- '


def _pct(value: Optional[float]) -> str:
  return '-' if value is None else f'{100 * value:.1f} %'


def _gib(value: Optional[int]) -> str:
  return '-' if value is None else f'{value / GIB:.1f}'


def format_summary(results: dict[str, Any], out_dir: Optional[str] = None) -> str:
  """The short table printed last (the JSON holds every figure, unrounded)."""
  c, d = results['config'], results.get('device', {})
  peak = results.get('measured_peak', {}).get('flops_per_s')
  sheet = d.get('datasheet_bf16_flops_per_s')
  lines = [f'COSMOS {c["variant"]} train step, {c["dtype"]}, one {d.get("device_kind", "?")}: '
           f'datasheet peak {_si(sheet)}FLOP/s, measured matmul peak '
           f'{_si(peak)}FLOP/s']
  head = ('attention', 'batch', 'step (s)', 'samples/s', 'MFU sheet', 'MFU meas.',
          'peak GiB', 'compile s')
  lines.append(f'{head[0]:<11}' + ''.join(f'{h:>11}' for h in head[1:]))
  for name, r in results.get('attention', {}).items():
    b = r['best']
    if b is None:
      why = f'stopped by {r["stopped_by"]}'
      if r['trials']:
        why += f'; first error: {r["trials"][0].get("error", "?")[:80]}'
      lines.append(f'{name:<11}  no batch ran ({why})')
      continue
    cells = [b['batch'], f'{b["step_s"]:.4f}', f'{b["samples_per_s"]:.1f}',
             _pct(b.get('mfu_datasheet')), _pct(b.get('mfu_measured_peak')),
             _gib(b.get('peak_bytes_in_use')), f'{b["compile_s"]:.1f}']
    lines.append(f'{name:<11}' + ''.join(f'{str(x):>11}' for x in cells))
  for name, r in results.get('attention', {}).items():
    tried = ', '.join(f'{t["batch"]}{"" if t["ok"] else (" oom" if t["oom"] else " error")}'
                      for t in r['trials'])
    lines.append(f'  {name} batches tried: {tried or "none"} (stopped: {r["stopped_by"]})')
  for name, p in results.get('parity', {}).items():
    if p is None:
      lines.append(f'  parity {name} vs {results["search"]["reference"]}: no common batch')
      continue
    lines.append(f'  parity {name} vs {results["search"]["reference"]} at batch {p["batch"]}: '
                 f'loss rel err {p["loss_rel_err"]:.2e}, grads {p["grads_rel_err"]:.2e} '
                 f'(tolerance {p["tolerance"]["loss"]:g} / {p["tolerance"]["grads"]:g}): '
                 f'{"ok" if p["ok"] else "FAILED"}')
  official = results.get('official')
  if official:
    if 'official_step_s' in official:
      speed = official.get('speedup_of_ours_at_same_batch')
      lines.append(f'  official PyTorch step at batch {official["official_batch"]}: '
                   f'{official["official_step_s"]:.4f} s ({official["official_samples_per_s"]:.1f}'
                   f' samples/s)' + (f'; ours is {speed:.2f}x faster' if speed else ''))
    else:
      lines.append(f'  official: {official.get("official_error", "?").splitlines()[-1][:160]}')
  lines.append(f'  total {results.get("total_s", 0):.0f} s' +
               (f'; JSON: {os.path.join(out_dir, RESULT_FILE)}' if out_dir else ''))
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m cosmos_jax.bench.gpu',
      description='The COSMOS train step on one GPU at the largest batch that fits, per '
                  'attention implementation; figures as JSON in OUT_DIR, a table last.')
  parser.add_argument('--out', required=True, help='folder for gpu_bench.json')
  parser.add_argument('--config', default=DEFAULT_CONFIG,
                      help='config file[:arg] (default: configs/merged30m_vitb16.py)')
  parser.add_argument('--attention', default='xla,cudnn',
                      help='comma-separated model.attention values; the first is the reference')
  parser.add_argument('--start', type=int, default=32, help='first per-device batch')
  parser.add_argument('--cap', type=int, default=4096, help='largest batch to try')
  parser.add_argument('--repeats', type=int, default=5, help='timed steps per trial')
  parser.add_argument('--budget-s', type=float, default=300.0,
                      help='no new trial starts that would end after this many seconds')
  parser.add_argument('--official-repo', help='checkout of ExplainableML/cosmos (holds src/)')
  parser.add_argument('--peak-tflops', type=float,
                      help='datasheet bf16 dense peak, for a GPU the table does not know')
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--in-process', dest='in_process', action='store_true', default=None,
                    help='run the trials in this process (default on a machine without a GPU)')
  mode.add_argument('--subprocess', dest='in_process', action='store_false',
                    help='one process per trial (default where a GPU is present)')
  args, overrides = parser.parse_known_args(argv)
  config = bench_config(args.config, overrides)
  attention = [a.strip() for a in args.attention.split(',') if a.strip()]
  results = run(args.out, config=config, attention=attention, start=args.start, cap=args.cap,
                repeats=args.repeats, budget_s=args.budget_s, official_repo=args.official_repo,
                in_process=args.in_process, peak_tflops=args.peak_tflops)
  print(format_summary(results, args.out))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
