"""Per-device memory and collectives of the COSMOS losses alone, compiled for a TPU topology.

Compiles value-and-gradient of ``losses.cosmos_objective`` with respect to the features,
(V, N, E) float32 stacks split over the batch axes, once on global arrays left to XLA's
partitioner ("global") and once per device with explicit collectives ("sharded"), and prints
what each compiled program needs per device. Needs the libtpu wheel that matches jax; runs on a
CPU host:

  JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python docs/losses_aot.py --topology v5e:8x8 --batch 4096

Collectives: count and bytes (each op's result size per device) executed per call, loops
unrolled by their trip counts; 'ops' is the number of such ops in the program text.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cosmos_jax import losses

BATCH_AXES = ('data', 'fsdp')
KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 's32': 4, 'u32': 4, 'pred': 1, 'f16': 2, 's8': 1, 'u8': 1}
# `%x = f32[2,4096,512]{...} all-gather(` or a tuple result `%x = (f32[..], ..) all-reduce(`.
_OP = re.compile(r'=\s*(\(.*?\)|\S+)\s+(' + '|'.join(KINDS) + r')(-start)?\(')
_SHAPE = re.compile(r'(\w+)\[([\d,]*)\]')
_WHILE = re.compile(r'\swhile\(.*?condition=%([\w.-]+), body=%([\w.-]+)')
_BOUND = re.compile(r'constant\((\d+)\)')
_CALLS = re.compile(r'calls=%([\w.-]+)')
_CHAIN = re.compile(r'chain_id="(\d+)"')


def topology_devices(name: str) -> list:
  chip_config = 'megacore' if name.split(':')[0] in ('v4', 'v5') else 'default'
  return list(topologies.get_topology_desc(platform='tpu', topology_name=name,
                                           chip_config_name=chip_config,
                                           chips_per_host_bounds=(2, 2, 1),
                                           num_slices=1).devices)


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """Computation name -> its lines, and the entry computation's name."""
  comps, entry, name = {}, None, None
  for line in hlo.splitlines():
    if name is None:
      m = re.match(r'(ENTRY )?%([\w.-]+) ', line)
      if m and line.rstrip().endswith('{'):
        name = m.group(2)
        entry = name if m.group(1) else entry
        comps[name] = []
    elif line.startswith('}'):
      name = None
    else:
      comps[name].append(line)
  return comps, entry


def _result_bytes(result: str, is_async_start: bool) -> int:
  shapes = _SHAPE.findall(result)
  if is_async_start:   # (operands..., results...): the second half are the results
    shapes = shapes[len(shapes) // 2:]
  return sum(_DTYPE_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(',') if d]))
             for dt, dims in shapes)


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """kind -> {'count', 'bytes', 'ops'} executed per call of a compiled HLO module, per device.

  Ops inside a while loop count once per trip; the trip count is read off the loop's
  condition (JAX's scans compare a counter from 0 with a constant bound). XLA:TPU splits a
  gather it overlaps with a matmul into a chain of fused steps marked with one ``chain_id``:
  a chain counts as one collective. 'ops' is the number of such collectives in the program
  text, whatever the loops.
  """
  comps, entry = _computations(hlo)
  chains_seen: set[str] = set()
  memo: dict[str, dict] = {}

  def add(out: dict, inner: dict, trips: int) -> None:
    for kind, v in inner.items():
      out[kind]['count'] += trips * v['count']
      out[kind]['bytes'] += trips * v['bytes']
      out[kind]['ops'] += v['ops']

  def walk(name: str) -> dict:
    if name not in memo:
      out = collections.defaultdict(lambda: {'count': 0, 'bytes': 0, 'ops': 0})
      for line in comps.get(name, ()):
        m = _OP.search(line)
        chain = _CHAIN.search(line)
        if m and not (chain and chain.group(1) in chains_seen):
          if chain:
            chains_seen.add(chain.group(1))
          result, kind, start = m.groups()
          out[kind]['count'] += 1
          out[kind]['ops'] += 1
          out[kind]['bytes'] += _result_bytes(result, bool(start) and result.startswith('('))
        w = _WHILE.search(line)
        if w:
          bounds = [int(b) for c in comps.get(w.group(1), ()) for b in _BOUND.findall(c)]
          add(out, walk(w.group(2)), max(bounds) if bounds else 1)
        for called in _CALLS.findall(line):
          add(out, walk(called), 1)
      memo[name] = dict(out)
    return memo[name]

  return walk(entry)


def abstract_features(mesh: Mesh, n: int, embed: int) -> tuple[dict, dict]:
  split = NamedSharding(mesh, P(None, BATCH_AXES, None))
  stack = lambda views: jax.ShapeDtypeStruct((views, n, embed), jnp.float32, sharding=split)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  student = {k: stack(8) for k in ('image_features', 'text_features', 'image_cross',
                                   'text_cross')}
  student.update(logit_scale=scalar, distill_logit_scale=scalar)
  return student, {k: stack(2) for k in ('image_features', 'text_features')}


def measure(mesh: Mesh, n: int, embed: int, sharded: bool) -> dict:
  student, teacher = abstract_features(mesh, n, embed)
  objective = lambda s, t: losses.cosmos_objective(s, t, mesh=mesh if sharded else None)
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  out_shardings = ((NamedSharding(mesh, P()), None),
                   jax.tree.map(lambda x: x.sharding, student))
  start = time.time()
  compiled = jax.jit(grad_fn, out_shardings=out_shardings).lower(student, teacher).compile()
  mem = compiled.memory_analysis()
  return {
      'formulation': 'sharded' if sharded else 'global',
      'compile_s': round(time.time() - start, 1),
      'per_device_bytes': {'argument': mem.argument_size_in_bytes,
                           'output': mem.output_size_in_bytes,
                           'temp': mem.temp_size_in_bytes},
      'collectives': collectives(compiled.as_text()),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--topology', default='v5e:8x8')
  parser.add_argument('--batch', type=int, default=4096, help='global batch N')
  parser.add_argument('--embed', type=int, default=512, help='feature width E (B/16: 512)')
  parser.add_argument('--only', choices=('global', 'sharded'))
  args = parser.parse_args()
  devices = topology_devices(args.topology)
  mesh = Mesh(np.asarray(devices).reshape(1, len(devices), 1), ('data', 'fsdp', 'model'),
              axis_types=(AxisType.Auto,) * 3)
  for sharded in (False, True):
    if args.only and args.only != ('sharded' if sharded else 'global'):
      continue
    result = measure(mesh, args.batch, args.embed, sharded)
    result.update(topology=args.topology, devices=len(devices), batch=args.batch,
                  embed=args.embed)
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
