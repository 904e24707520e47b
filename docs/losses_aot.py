"""Per-device memory and collectives of the COSMOS losses alone, compiled for a TPU topology.

Compiles value-and-gradient of ``losses.cosmos_objective`` with respect to the features,
(V, N, E) float32 stacks split over the batch axes, once on global arrays left to XLA's
partitioner ("global") and once per device with explicit collectives ("sharded"), and prints
what each compiled program needs per device. Needs the libtpu wheel that matches jax; runs on a
CPU host:

  JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python docs/losses_aot.py --topology v5e:8x8 --batch 4096

Collectives: count and bytes (each op's result size per device) executed per call, loops
unrolled by their trip counts (see ``collectives``).
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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cosmos_jax import losses
from cosmos_jax.bench import hlo, topology

BATCH_AXES = ('data', 'fsdp')
_CHAIN = re.compile(r'chain_id="(\d+)"')
_CONDITION = re.compile(r'condition=%?([\w.\-]+)')


def _kind(inst: hlo.Instruction) -> str | None:
  op = inst.opcode
  if op.endswith(('-start', '-update')):
    return None   # an async pair counts at its -done
  op = op[:-len('-done')] if op.endswith('-done') else op
  return op if op in hlo.KINDS else None


def _trips(inst: hlo.Instruction, computations: dict) -> int:
  """A while loop's trip count: XLA's known_trip_count, else the bound its condition compares
  the counter with (JAX's scans count from 0 up to a constant)."""
  known = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', inst.attrs)
  if known:
    return int(known.group(1))
  condition = _CONDITION.search(inst.attrs)
  bounds = [int(i.attrs.split(')')[0]) for i in computations.get(condition.group(1), ())
            if i.opcode == 'constant' and i.attrs.split(')')[0].isdigit()] if condition else []
  return max(bounds, default=1)


def collectives(text: str) -> dict[str, dict[str, int]]:
  """kind -> {'count', 'bytes'} executed per call, per device (result bytes of each op).

  As ``bench.hlo.collective_summary``, with two differences this libtpu's loss programs need:
  a while loop without ``known_trip_count`` runs as often as its condition's bound says, and
  the fused steps of one gather that XLA:TPU overlaps with a matmul (async collective fusions
  sharing a ``chain_id``) count as one collective.
  """
  computations, entry = hlo.parse_computations(text)
  summary = collections.defaultdict(lambda: {'count': 0, 'bytes': 0})
  chains: set[str] = set()
  stack = [(entry, 1)]
  while stack:
    name, times = stack.pop()
    for inst in computations.get(name, ()):
      kind = _kind(inst)
      chain = _CHAIN.search(inst.attrs)
      if kind and not (chain and chain.group(1) in chains):
        chains.update([chain.group(1)] if chain else [])
        summary[kind]['count'] += times
        summary[kind]['bytes'] += times * hlo.shape_bytes(inst.shape)
      if inst.opcode in ('async-update', 'async-done'):
        continue   # the wrapped computation counts once, at async-start
      for key, callee in re.findall(r'\b(calls|body|true_computation|false_computation)='
                                    r'%?([\w.\-]+)', inst.attrs):
        stack.append((callee, times * (_trips(inst, computations) if key == 'body' else 1)))
  return dict(summary)


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
  parser.add_argument('--topology', default='v5e:8x8',
                      help='a libtpu topology (v5e:16x16) or a slice name (v5e-256)')
  parser.add_argument('--batch', type=int, default=4096, help='global batch N')
  parser.add_argument('--embed', type=int, default=512, help='feature width E (B/16: 512)')
  parser.add_argument('--only', choices=('global', 'sharded'))
  args = parser.parse_args()
  devices = topology.target_devices(topology.parse_target(args.topology))
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
