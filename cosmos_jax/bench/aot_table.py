"""The ``bench --tpu-topology`` report as text (the figures are in ``aot.run``'s dict)."""

from __future__ import annotations

from typing import Any

from cosmos_jax.bench import hlo

GIB = 2 ** 30


def _gib(n: float) -> str:
  return f'{n / GIB:.2f} GiB'


def _bytes(n: float) -> str:
  for unit, size in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if abs(n) >= size:
      return f'{n / size:.2f} {unit}'
  return f'{int(n)} B'


def _setup(r: dict[str, Any]) -> str:
  mesh = ','.join(map(str, r['mesh'])) if r.get('mesh') else '?'
  return (f'mesh ({mesh}) {r.get("preset", "?")}, global batch {r.get("global_batch", "?")}, '
          f'{r.get("dtype", "?")}, remat {"on" if r.get("remat") else "off"}')


def memory_line(r: dict[str, Any]) -> str:
  """One device's memory against its chip's HBM, or why there is none."""
  hbm = r['hbm_bytes']
  if 'per_device_bytes' in r:
    m = r['per_device_bytes']
    verdict = 'fits' if r['fits'] else 'DOES NOT FIT'
    return (f'per device: argument {_gib(m["argument"])}, output {_gib(m["output"])} '
            f'({_gib(m["alias"])} of it aliased to the donated state), temp {_gib(m["temp"])}, '
            f'code {_gib(m["code"])}; total {_gib(m["total"])} of {_gib(hbm)} HBM: {verdict}, '
            f'headroom {_gib(r["headroom_bytes"])} ({100 * r["headroom"]:.0f}%)')
  if r.get('oom'):
    need, have = r['oom']['required_bytes'], r['oom']['available_bytes']
    sizes = (f'XLA needs {_gib(need)} per device, {_gib(have)} of HBM is available'
             if need else 'XLA gives no sizes')
    return f'DOES NOT FIT: {sizes} ({r.get("error", "")})'
  return f'not compiled: {r.get("error", "unknown error")}'


def format_one(r: dict[str, Any]) -> list[str]:
  lines = [memory_line(r)]
  if 'per_device_bytes' in r:
    c = r['cost']
    model = r.get('model_flops_per_device')
    lines.append(f'XLA cost per device: {c["flops"] / 1e12:.3f} TFLOP, '
                 f'{c["bytes_accessed"] / 1e9:.2f} GB accessed'
                 + (f' (model matmul FLOPs, counted analytically: {model / 1e12:.3f} TFLOP)'
                    if model else ''))
    e = r['estimate']
    lines.append(f'estimated step time (an estimate from the cost analysis, not a measurement): '
                 f'{e["step_s"]:.3f} s, {e["bound"]}-bound (compute {e["compute_s"]:.3f} s at '
                 f'{e["peak_flops"] / 1e12:.0f} TFLOP/s, HBM {e["memory_s"]:.3f} s at '
                 f'{e["hbm_bytes_per_s"] / 1e9:.0f} GB/s; collectives not included)')
    lines.append('collectives per step and device (count, bytes of their results):')
    for kind in hlo.KINDS:
      k = r['collectives'][kind]
      lines.append(f'  {kind:<19} {k["count"]:>6}  {_bytes(k["bytes"]):>12}')
    if r.get('collectives_note'):
      lines.append(f'  ({r["collectives_note"]})')
  if r.get('note'):
    lines.append(f'to make it fit: {r["note"]}')
  return lines


def format_report(results: dict[str, Any]) -> str:
  r = results['aot']
  v = results.get('versions', {})
  lines = [f'TPU compile for {r.get("name")} = {r["topology"]} ({r["devices"]} devices): '
           f'{results["config"]["variant"]}, {_setup(r)}',
           f'compiled in {r.get("compile_s", float("nan")):.1f} s on this machine '
           f'(jax {v.get("jax", "?")}, libtpu {v.get("libtpu", "?")})']
  lines += format_one(r)
  if 'search' in results:
    lines.append('')
    lines.append('search (each change compiled in turn until one fits):')
    for row in results['search']:
      lines.append(f'  {row["change"]}')
      lines += ['    ' + l for l in format_one(row)[:1]]
    first = results.get('first_fit')
    lines.append(f'first that fits: {first}' if first else 'none of the changes fits')
  return '\n'.join(lines)
