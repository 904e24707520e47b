"""The bench results as a plain-text table (the JSON holds the same figures, unrounded)."""

from __future__ import annotations

from typing import Any, Optional

GIB = 2 ** 30


def si(value: Optional[float], unit: str = '') -> str:
  """1.1e12 -> '1.10 T' (powers of 1000, as FLOP counts are quoted)."""
  if value is None:
    return '-'
  for factor, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= factor:
      return f'{value / factor:.3g} {prefix}{unit}'
  return f'{value:.3g} {unit}'.rstrip()


def _header(r: dict[str, Any]) -> str:
  c, m = r['config'], r['machine']
  crops = f'2x{c["global_size"]} + {c["num_local"]}x{c["local_size"]} px'
  kind = 'COSMOS' if c['cosmos'] else 'CLIP'
  cpu = f', {m["cpu_model"]}, {m["cpu_cores"]} cores' if m.get('cpu_model') else ''
  if m.get('backend') == 'cpu':
    cpu += ', huge pages' if m.get('host_huge_pages') else ', 4 KiB pages'
    cpu += ', malloc arenas kept' if m.get('host_malloc_arenas_kept') else ''
    cpu += ', block cache' if m.get('host_block_cache') else ''
  mesh = ','.join(str(s) for s in c['mesh'])
  return (f'{c["variant"]} ({kind}), batch {c["batch_size"]}, crops {crops}, '
          f'{c["num_captions"]} captions, {c["dtype"]}{", remat" if c["remat"] else ""}, '
          f'mesh {mesh} ({c["preset"]})\n'
          f'{m["device_count"]} x {m["device_kind"]} ({m["backend"]}){cpu}; {r["date"]}')


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
  rows = []
  if 'train_step_s' in r:
    rows += [('train step (s)', f'{r["train_step_s"]:.3f}'),
             ('train samples/s', f'{r["train_samples_per_s"]:.2f}'),
             ('compile (s)', f'{r["compile_s"]:.1f}')]
  flops = r['flops']
  rows.append(('model FLOPs/step', si(r['model_flops_per_step'])))
  rows.append(('  student fwd / bwd, teacher fwd',
               f'{si(flops["student_forward"])} / {si(flops["student_backward"])}, '
               f'{si(flops["teacher_forward"])}'))
  if r.get('executed_flops_per_step'):
    rows.append(('  executed (last blocks pooled-only)', si(r['executed_flops_per_step'])))
  if r.get('xla_flops'):
    rows.append(("  XLA's count (incl. elementwise)", si(r['xla_flops'])))
  if 'achieved_flops_per_s' in r:
    rows.append(('achieved FLOP/s (executed)', si(r['achieved_flops_per_s'])))
  for dtype, peak in r.get('peak_flops_per_s', {}).items():
    rows.append((f'matmul peak FLOP/s ({dtype})', si(peak)))
  if 'fraction_of_peak' in r:
    rows.append((f'fraction of {r["config"]["dtype"]} peak', f'{100 * r["fraction_of_peak"]:.1f} %'))
  if 'model_fraction_of_peak' in r:
    rows.append(('  the same, over model FLOPs (MFU)',
                 f'{100 * r["model_fraction_of_peak"]:.1f} %'))
  if 'data_samples_per_s' in r:
    rows.append(('data pipeline samples/s', f'{r["data_samples_per_s"]:.1f}'))
  if 'eval_images_per_s' in r:
    rows.append(('eval images/s', f'{r["eval_images_per_s"]:.1f}'))
  if 'official_step_s' in r:
    rows += [('official step (s)', f'{r["official_step_s"]:.3f}'),
             ('official samples/s', f'{r["official_samples_per_s"]:.2f}')]
    if 'speedup_vs_official' in r:
      rows.append(('speedup vs official', f'{r["speedup_vs_official"]:.2f} x'))
    if 'official_fraction_of_peak' in r:
      rows.append(('official fraction of float32 peak',
                   f'{100 * r["official_fraction_of_peak"]:.1f} %'))
    if r.get('official_matmul_flops_per_s'):
      rows.append(('  torch matmul FLOP/s (float32)', si(r['official_matmul_flops_per_s'])))
    if 'fraction_of_torch_peak' in r:
      rows.append(('  ours / official, of the torch peak',
                   f'{100 * r["fraction_of_torch_peak"]:.1f} % / '
                   f'{100 * r["official_fraction_of_torch_peak"]:.1f} %'))
  if 'official_error' in r:
    rows.append(('official', f'error: {r["official_error"].splitlines()[0]}'))
  load = r.get('load_average') or {}
  if load.get('start'):
    end = load.get('end') or ['-']
    rows.append(('load average 1 min (start / end)', f'{load["start"][0]} / {end[0]}'))
  return rows


def _memory(rows: list[dict[str, Any]], note: Optional[str]) -> list[str]:
  head = ('mesh', 'devices', 'batch', 'arguments', 'outputs', 'aliased', 'temp', 'peak')
  lines = ['per-device memory of the compiled train step (GiB; peak = arguments + outputs '
           '- aliased + temp + code)',
           '  ' + f'{head[0]:<10}' + ''.join(f'{h:>10}' for h in head[1:])]
  for row in rows:
    mesh = ','.join(str(s) for s in row['mesh'])
    if 'error' in row:
      lines.append(f'  {mesh:<10}  error: {row["error"]}')
      continue
    cells = [row['devices'], row.get('global_batch', '-')] + [
        f'{row[k] / GIB:.2f}' for k in ('argument_bytes', 'output_bytes', 'alias_bytes',
                                         'temp_bytes', 'peak_bytes')]
    lines.append(f'  {mesh:<10}' + ''.join(f'{c:>10}' for c in cells))
  if note:
    lines.append(f'  ({note})')
  return lines


def format_table(results: dict[str, Any]) -> str:
  rows = _rows(results)
  width = max(len(name) for name, _ in rows)
  lines = [_header(results)] + [f'  {name:<{width}}  {value:>12}' for name, value in rows]
  if results.get('memory'):
    lines += [''] + _memory(results['memory'], results.get('memory_note'))
  return '\n'.join(lines)
