"""``bench --tpu-topology``: slice names, the HLO collective count, the OOM message, and the
tiny step compiled for a v5e 2x2 slice by XLA:TPU (when libtpu is installed)."""

import importlib.util
import json

import jax
import pytest

from cosmos_jax import cli, models
from cosmos_jax.bench import aot, hlo, topology
from cosmos_jax.demo import demo_config
from cosmos_jax.errors import UsageError

GIB = 2 ** 30
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


@pytest.mark.parametrize('name, libtpu_name, chips', [
    ('v5e-256', 'v5e:16x16', 256), ('v5e-64', 'v5e:8x8', 64), ('v5e-8', 'v5e:2x4', 8),
    ('v4-128', 'v4:4x4x4', 64),       # v4 names count TensorCores: 2 per chip
    ('v4-8', 'v4:2x2x1', 4), ('v5p-128', 'v5:4x4x4', 64), ('v5p-256', 'v5:4x4x8', 128),
    ('v6e-64', 'v6e:8x8', 64), ('v5litepod-16', 'v5e:4x4', 16),
    ('v5e:16x16', 'v5e:16x16', 256), ('v5p:4x4x8', 'v5:4x4x8', 128),
    ('v5:2x2x2', 'v5:2x2x2', 8), ('V4:2x2x1', 'v4:2x2x1', 4)])
def test_topology_names(name, libtpu_name, chips):
  target = topology.parse_target(name)
  assert (target.libtpu_name, target.chips) == (libtpu_name, chips)


def test_topology_chip_figures():
  assert topology.parse_target('v5e-4').chip.hbm_bytes == 16 * GIB
  assert topology.parse_target('v4-8').chip.hbm_bytes == 32 * GIB
  assert topology.parse_target('v5p-8').chip.hbm_bytes == 95 * GIB
  assert topology.parse_target('v6e-4').chip.hbm_bytes == 32 * GIB
  assert topology.parse_target('v4-8').chip.chip_config == 'megacore'
  assert topology.parse_target('v5e-4').chip.chip_config == 'default'


@pytest.mark.parametrize('name, words', [
    ('v4-127', 'count TensorCores'), ('v4-6', 'count TensorCores'),
    ('v5e-100', 'count chips'), ('v7-8', "unknown generation 'v7'"),
    ('v5e:4x4x4', '2 positive dimensions'), ('v4:4x4', '3 positive dimensions'),
    ('tpu', 'give an accelerator type')])
def test_topology_bad_names(name, words):
  with pytest.raises(ValueError, match=words):
    topology.parse_target(name)


# Hand-written in XLA:TPU's style: an all-gather carried through two async collective fusions
# (one chain), an async all-gather and all-reduce pair, the reduce-scatter fusion (all-reduce +
# slice), a tuple all-reduce, a while loop of 3 trips around an all-to-all, and an async
# collective-permute.
HLO = """HloModule jit_train_step, entry_computation_layout={(f32[4,8]{1,0})->f32[4,8]{1,0}}

%async_collective_fusion.1 (param_0: f32[4,8]) -> f32[16,8] {
  %param_0 = f32[4,8]{1,0:T(8,128)} parameter(0)
  ROOT %all-gather.1 = f32[16,8]{1,0:T(8,128)S(1)} all-gather(%param_0), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="7"}
}

%async_collective_fusion.2 (param_0: f32[4,8]) -> f32[16,8] {
  %param_0 = f32[4,8]{1,0:T(8,128)} parameter(0)
  ROOT %all-gather.2 = f32[16,8]{1,0:T(8,128)S(1)} all-gather(%param_0), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="7"}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%a, %b)
}

%all-reduce-scatter.3 (input: f32[64,256]) -> f32[16,256] {
  %input = f32[64,256]{1,0} parameter(0)
  %all-reduce.9 = f32[64,256]{1,0} all-reduce(%input), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  %sixteen = u32[] constant(16)
  %offset = u32[] multiply(%pid, %sixteen)
  %zero = u32[] constant(0)
  ROOT %slice = f32[16,256]{1,0} dynamic-slice(%all-reduce.9, %offset, %zero), dynamic_slice_sizes={16,256}
}

%body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p = (s32[], bf16[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[8,128]{1,0} get-tuple-element(%p), index=1
  %a2a = bf16[8,128]{1,0} all-to-all(%x), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %t = (s32[], bf16[8,128]{1,0}) tuple(%i, %a2a)
}

%cond (p: (s32[], bf16[8,128])) -> pred[] {
  %p = (s32[], bf16[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %three), direction=LT
}

ENTRY %main.1_spmd (x: f32[4,8], g: f32[64,256], y: bf16[8,128], u: f32[16], v: bf16[32]) -> f32[4,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %fusion.1 = f32[16,8]{1,0} fusion(%x), kind=kCustom, calls=%async_collective_fusion.1
  %fusion.3 = f32[16,8]{1,0} fusion(%x), kind=kCustom, calls=%async_collective_fusion.2
  %all-gather-start = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%x), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}
  %all-gather-done = f32[16,8]{1,0} all-gather-done(%all-gather-start)
  %g = f32[64,256]{1,0} parameter(1)
  %fusion.2 = f32[16,256]{1,0:T(8,128)} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.3
  %all-reduce-start = f32[64,256]{1,0} all-reduce-start(%g), channel_id=6, replica_groups={{0,1,2,3}}, to_apply=%add
  %all-reduce-done = f32[64,256]{1,0} all-reduce-done(%all-reduce-start)
  %u = f32[16]{0} parameter(3)
  %v = bf16[32]{0} parameter(4)
  %all-reduce.2 = (f32[16]{0}, bf16[32]{0}) all-reduce(%u, %v), channel_id=8, replica_groups={{0,1,2,3}}, to_apply=%add
  %y = bf16[8,128]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,128]{1,0}) tuple(%zero, %y)
  %while = (s32[], bf16[8,128]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %cp-start = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[], u32[]) collective-permute-start(%x), channel_id=7, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  ROOT %cp-done = f32[4,8]{1,0} collective-permute-done(%cp-start)
}
"""


def test_hlo_collectives_by_hand():
  summary, unknown = hlo.collective_summary(HLO)
  assert unknown == 0
  assert summary == {
      'all-gather': {'count': 2, 'bytes': 2 * 16 * 8 * 4},          # the chain's and the pair's
      'reduce-scatter': {'count': 1, 'bytes': 16 * 256 * 4},        # its all-reduce not again
      'all-reduce': {'count': 2, 'bytes': 64 * 256 * 4 + 16 * 4 + 32 * 2},
      'all-to-all': {'count': 3, 'bytes': 3 * 8 * 128 * 2},         # 3 trips of the loop
      'collective-permute': {'count': 1, 'bytes': 4 * 8 * 4},
  }


def test_hlo_loop_trips_from_its_condition():
  text = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', '')
  assert hlo.collective_summary(text) == hlo.collective_summary(HLO)   # i < 3: 3 trips
  le = text.replace('direction=LT', 'direction=LE')
  assert hlo.collective_summary(le)[0]['all-to-all']['count'] == 4
  # A bound that is no constant: the body counts once, and the summary says so.
  unknown = text.replace('%three = s32[] constant(3)', '%three = s32[] parameter(1)')
  summary, loops = hlo.collective_summary(unknown)
  assert loops == 1
  assert summary['all-to-all'] == {'count': 1, 'bytes': 8 * 128 * 2}


def test_hlo_shape_bytes():
  assert hlo.shape_bytes('bf16[192,64]{0,1:T(8,128)(2,1)S(1)}') == 192 * 64 * 2
  assert hlo.shape_bytes('(f32[2,3]{1,0}, u32[], pred[4])') == 24 + 4 + 4
  assert hlo.shape_bytes('token[]') == 0
  with pytest.raises(ValueError, match='no ENTRY'):
    hlo.parse_computations('%f (a: f32[]) -> f32[] {\n  ROOT %a = f32[] parameter(0)\n}\n')


def test_parse_oom_both_wordings():
  temps = ('RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total '
           'memory required for HLO temporaries (525.94G) exceeds available HBM (15.75G).')
  assert aot.parse_oom(temps) == {'required_bytes': int(525.94 * GIB),
                                  'available_bytes': int(15.75 * GIB)}
  used = ('RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 56.13G of 15.75G '
          'hbm. Exceeded hbm capacity by 40.38G.')
  assert aot.parse_oom(used)['required_bytes'] == int(56.13 * GIB)
  assert aot.parse_oom('INVALID_ARGUMENT: bad sharding') is None


def test_fit_changes_mildest_first():
  config = demo_config()
  config.mesh.shape, config.mesh.preset = (8, 1, 1), 'dp'
  changes = [aot.describe_change(c) for c in aot.fit_changes(config, 8)]
  assert changes[:3] == ['--config.mesh.shape=1,8,1 --config.mesh.preset=fsdp',
                         '--config.model.remat=True', '--config.model.dtype=bfloat16']
  assert len(changes) == 7   # three alone, three pairs, all three
  config.model.remat, config.model.dtype, config.mesh.shape = True, 'bfloat16', (1, 8, 1)
  config.mesh.preset = 'fsdp'
  assert aot.fit_changes(config, 8) == []


def test_missing_libtpu_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(aot.importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu' else real(name, *a))
  with pytest.raises(UsageError, match=r"pip install -e '\.\[aot\]'"):
    aot.run(demo_config(), 'v5e-4')
  assert aot.libtpu_requirement().startswith('libtpu')


def test_bench_flags_parse():
  args, extra = cli.build_parser().parse_known_args(
      ['bench', '--config', 'configs/demo.py', '--tpu-topology', 'v5e-256', '--json', 'x.json',
       '--search', '--config.batch_size=8'])
  assert (args.tpu_topology, args.out, args.search, extra) == (
      'v5e-256', 'x.json', True, ['--config.batch_size=8'])


def _state_bytes(config) -> int:
  """Student + EMA teacher + Adam's two moments, float32, from the parameter shapes."""
  shapes = jax.eval_shape(lambda: models.init_params(models.get_variant(config.model.variant),
                                                     jax.random.key(0)))
  return 4 * 4 * sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.slow   # one XLA:TPU compile of the tiny COSMOS step, ~60 s of CPU: the only check
@pytest.mark.skipif(not HAS_LIBTPU,  # that the step compiles for a TPU and shards its state
                    reason="libtpu not installed (make test-aot, or pip install -e '.[aot]')")
def test_tiny_step_compiles_for_v5e_2x2(tmp_path):
  config = demo_config()
  config.batch_size, config.mesh.shape, config.mesh.preset = 4, (1, 4, 1), 'fsdp'
  out = tmp_path / 'aot.json'
  results = aot.run(config, 'v5e:2x2', out_path=str(out))
  r = json.loads(out.read_text())['aot']
  assert r == json.loads(json.dumps(results['aot']))
  assert 'error' not in r, r.get('error')
  assert (r['topology'], r['devices'], r['hbm_bytes']) == ('v5e:2x2', 4, 16 * GIB)
  assert set(r['per_device_bytes']) >= {'argument', 'output', 'temp', 'code', 'total'}
  assert set(r['collectives']) == set(hlo.KINDS)
  assert all(set(v) == {'count', 'bytes'} for v in r['collectives'].values())
  assert set(r['cost']) >= {'flops', 'bytes_accessed'} and r['compile_s'] > 0
  # Each device holds its fsdp shard of the state (plus a few replicated biases and its
  # quarter of the batch), and the donated state aliases the output.
  shard = _state_bytes(config) / 4
  m = r['per_device_bytes']
  assert 0.99 * shard <= m['argument'] <= 1.15 * shard
  assert m['alias'] >= 0.99 * shard
  assert r['fits'] and r['headroom'] > 0.9
  # XLA's FLOPs are one device's: near a quarter of the analytic count, not all of it.
  assert 0.5 <= r['cost']['flops'] / r['model_flops_per_device'] <= 2.0
  # The fsdp step gathers the weights and reduce-scatters the gradients.
  assert r['collectives']['all-gather']['count'] > 0
  assert r['collectives']['reduce-scatter']['count'] > 0
