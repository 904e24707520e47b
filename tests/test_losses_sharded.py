"""The sharded losses' structure and memory (their values and gradients: test_losses.py)."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cosmos_jax import config_cli, losses
from cosmos_jax.bench import build as bench_build
from cosmos_jax.train import from_config, partition

COLLECTIVES = ('all_gather', 'reduce_scatter', 'psum', 'psum_invariant', 'pmax', 'pmin',
               'all_to_all', 'ppermute')
DEMO = os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo.py')


def _features(n, e, *, abstract_on=None):
  """Student (8 views) and teacher (2 views) stacks; ShapeDtypeStructs split over the batch
  axes of ``abstract_on`` when given."""
  if abstract_on is None:
    stack = lambda v: jnp.ones((v, n, e), jnp.float32)
    scalar = jnp.float32(2.6)
  else:
    split = NamedSharding(abstract_on, P(None, partition.BATCH_AXES, None))
    stack = lambda v: jax.ShapeDtypeStruct((v, n, e), jnp.float32, sharding=split)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(abstract_on, P()))
  student = {k: stack(8) for k in ('image_features', 'text_features', 'image_cross',
                                   'text_cross')}
  student.update(logit_scale=scalar, distill_logit_scale=scalar)
  return student, {k: stack(2) for k in ('image_features', 'text_features')}


def _primitives(jaxpr, in_loop=False, counts=None):
  """(primitive name, inside a scan/while) -> count, over all nested jaxprs."""
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name, in_loop] += 1
    loop = in_loop or eqn.primitive.name in ('scan', 'while')
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          _primitives(sub, loop, counts)
  return counts


@pytest.mark.parametrize('distill,column_stacks', [(True, 3), (False, 1)])
def test_each_column_stack_is_gathered_once_and_no_collective_runs_per_pair(distill,
                                                                          column_stacks):
  """Column stacks: the 2 global image views (CLIP, against 8 captions) and the teacher's
  image and text stacks (distillation, against 8 cross-modal views each), whatever the
  number of terms (5) and pairs (80) that read them. The official loss gathers per pair."""
  mesh = partition.make_mesh((2, 4, 1))
  student, teacher = _features(16, 8)
  teacher = teacher if distill else None
  objective = lambda s, t: losses.cosmos_objective(s, t, distill=distill, mesh=mesh)[0]
  forward = _primitives(jax.make_jaxpr(objective)(student, teacher).jaxpr)
  assert forward['shard_map', False] == 1
  assert forward['all_gather', False] == column_stacks
  backward = _primitives(jax.make_jaxpr(jax.grad(objective))(student, teacher).jaxpr)
  assert backward['scan', False] > 0   # the pair loops are there ...
  inside = {name for (name, loop), count in backward.items() if loop and count}
  assert not inside & set(COLLECTIVES)   # ... and no collective inside them


def test_one_device_mesh_keeps_the_global_formulation():
  mesh = partition.make_mesh((1, 1, 8))   # model axis only: the batch is not split
  student, teacher = _features(16, 8)
  objective = lambda s, t: losses.cosmos_objective(s, t, mesh=mesh)[0]
  assert _primitives(jax.make_jaxpr(objective)(student, teacher).jaxpr)['shard_map', False] == 0


def test_batch_not_divisible_by_the_devices_is_named():
  student, teacher = _features(12, 8)
  with pytest.raises(ValueError, match=r'loss batch 12 is not divisible by the 8 devices'):
    losses.cosmos_objective(student, teacher, mesh=partition.make_mesh((8, 1, 1)))


def test_temporaries_per_device_scale_with_the_batch_split():
  """Compiled temporaries of value-and-gradient on 8 devices are at most the one-device
  formulation's divided by 8 (+20%), plus the gathered column stacks, which by design are
  whole on every device. XLA's partitioning of the global formulation misses this bound
  (about 1.37x one-device / 8 here), so a lost sharding shows."""
  n, e = 512, 32

  def temp_bytes(mesh, sharded):
    student, teacher = _features(n, e, abstract_on=mesh)
    objective = lambda s, t: losses.cosmos_objective(s, t, mesh=mesh if sharded else None)
    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    return grad_fn.lower(student, teacher).compile().memory_analysis().temp_size_in_bytes

  one_device = temp_bytes(partition.make_mesh((1, 1, 1), devices=jax.devices()[:1]), False)
  sharded = temp_bytes(partition.make_mesh((8, 1, 1)), True)
  gathered = 4 * (2 + 2 + 2) * n * e
  assert sharded <= 1.2 * one_device / 8 + gathered, (sharded, one_device)


@pytest.mark.parametrize('mesh_shape,sharded', [((2, 2, 2), True), ((1, 1, 1), False)])
def test_train_step_uses_the_sharded_losses_where_the_batch_is_split(mesh_shape, sharded):
  """The step built from a config: per-device losses on a split batch, the global ones on
  one device (the CPU step's path). Traced only; the numbers are test_losses.py's."""
  config = config_cli.load_config_file(DEMO)
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  build = from_config.build_train_step(config, partition.make_mesh(mesh_shape, devices))
  state, batch = bench_build.abstract_inputs(build, 8)
  counts = _primitives(build.train_step.trace(state, batch).jaxpr)
  assert (counts['all_gather', False] > 0) == sharded


_LOOP_AND_CHAIN_HLO = '''HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %bound = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %bound), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

%gather_step (a: bf16[2,4]) -> bf16[2,8] {
  %a = bf16[2,4] parameter(0)
  ROOT %ag = bf16[2,8]{1,0} all-gather(%a), dimensions={1}, frontend_attributes={chain_id="0"}
}

%gather_continued (a: bf16[2,4]) -> bf16[2,8] {
  %a = bf16[2,4] parameter(0)
  ROOT %ag2 = bf16[2,8]{1,0} all-gather(%a), dimensions={1}, frontend_attributes={chain_id="0"}
}

ENTRY %main (x: f32[8], y: bf16[2,4]) -> (s32[], f32[8]) {
  %x = f32[8]{0} parameter(0)
  %y = bf16[2,4]{1,0} parameter(1)
  %f1 = bf16[2,8]{1,0} fusion(%y), kind=kCustom, calls=%gather_step
  %f2 = bf16[2,8]{1,0} fusion(%y), kind=kCustom, calls=%gather_continued
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]) tuple(%zero, %x)
  ROOT %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
}
'''


def test_loss_aot_counts_loop_trips_and_gather_chains():
  """docs/losses_aot.py: a loop without known_trip_count runs its condition's bound times; the
  fused steps of one chained gather are one all-gather (hand-written HLO, counted by hand)."""
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), '..', 'docs', 'losses_aot.py')
  spec = importlib.util.spec_from_file_location('losses_aot', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.collectives(_LOOP_AND_CHAIN_HLO) == {
      'all-reduce': {'count': 4, 'bytes': 4 * 8 * 4},
      'all-gather': {'count': 1, 'bytes': 2 * 8 * 2}}
