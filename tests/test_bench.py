"""The bench: analytic FLOPs against independent counts, peak, memory table, run and CLI."""

import json
import math
import sys
import types

import jax
import pytest
from jax.extend import core as jcore

from cosmos_jax import bench, cli, config_cli, models
from cosmos_jax.bench import data_pod
from cosmos_jax.bench import flops as flops_lib
from cosmos_jax.bench import memory as memory_lib
from cosmos_jax.bench import runner as run_lib
from cosmos_jax.bench.build import abstract_inputs
from cosmos_jax.train.from_config import build_train_step
from cosmos_jax.bench.peak import matmul_peak
from cosmos_jax.train import partition


def _config(*overrides):
  config = config_cli.load_config_file('configs/demo.py')
  config_cli.apply_overrides(config, list(overrides))
  return config


def _traced_step(config):
  """The train step traced on one device from abstract inputs (nothing allocated)."""
  mesh = partition.make_mesh((1, 1, 1), jax.devices()[:1])
  build = build_train_step(config, mesh)
  state, batch = abstract_inputs(build, config.batch_size)
  with jax.set_mesh(mesh):
    return build.train_step.trace(state, batch), build


def jaxpr_matmul_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general and convolution the program runs (scans x length).

  Read off the traced step itself, so it is independent of ``bench.flops``'s formulas.
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
      per_output = math.prod(rhs) // out_features // eqn.params['feature_group_count']
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
    times = eqn.params['length'] if name == 'scan' else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jcore.ClosedJaxpr):
          total += times * jaxpr_matmul_flops(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          total += times * jaxpr_matmul_flops(sub)
  return total


def test_tiny_step_flops_by_hand():
  # tiny: widths 64 (MLP 256), 2 layers per tower, 8 px patches, 77 text positions, embed 64.
  # Batch 4 of 2 x 32 px global crops (16 patches + class), 6 x 16 px local (4 + class),
  # 8 captions. Multiply-adds per token per layer: 12 d^2 (qkv 3, out 1, MLP 8) + 2 T d.
  d, per_layer = 64, 12 * 64 * 64
  block = lambda seqs, t: 2 * seqs * t * (per_layer + 2 * t * d)        # x 2 layers
  vis_global = block(8, 17) + 8 * 16 * 192 * d + 8 * d * d              # + patches + proj
  vis_local = block(24, 5) + 24 * 4 * 192 * d + 24 * d * d
  text = block(32, 77) + 32 * d * d
  mappings = 4 * 16 * d * d + 4 * 77 * d * d
  # Pooler: q and out projections per query, k/v over the context, 2 x Q x L x d attention.
  pooler = lambda q, ctx: 4 * (2 * q * d * d + 2 * ctx * d * d + 2 * q * ctx * d)
  poolers = pooler(8, 77) + pooler(8, 16)
  loss = (16 + 4 * 16) * 4 * 4 * d                                       # 80 pairs of 4x4
  student = vis_global + vis_local + text + mappings + poolers + loss
  teacher = block(8, 17) + 8 * 16 * 192 * d + 8 * d * d + block(8, 77) + 8 * d * d
  expected = 2 * (3 * student + teacher)
  got = flops_lib.train_step_flops(models.get_variant('tiny'), flops_lib.StepShape(4, 32, 16))
  assert got['total'] == expected
  assert got['teacher_forward'] == 2 * teacher
  # The last block of a row read at its pooled position only: the query projection, keys and
  # values over all T positions, 1 x T attention, out projection and MLP on one row:
  # d^2 + 2 T d^2 + 2 T d + d^2 + 8 d^2 multiply-adds instead of 12 T d^2 + 2 T^2 d.
  skip = lambda rows, t: rows * (12 * t * d * d + 2 * t * t * d - (10 * d * d + 2 * t * d * d
                                                                  + 2 * t * d))
  # Student: global crop 2, the 6 local crops, captions 2-8; teacher: every row.
  skip_student = skip(4, 17) + skip(24, 5) + skip(28, 77)
  skip_teacher = skip(8, 17) + skip(8, 77)
  assert got['executed'] == 2 * (3 * (student - skip_student) + teacher - skip_teacher)


def test_b16_step_is_about_1_1_tflop():
  got = flops_lib.train_step_flops(models.get_variant('ViT-B-16'), flops_lib.StepShape(2, 224, 96))
  assert 1.05e12 < got['total'] < 1.15e12


@pytest.mark.parametrize('overrides,xla_ratio', [
    # tiny: width 64 makes LayerNorm/GELU/softmax and AdamW over the 3.2M-entry token table
    # a sizeable share (about 11% measured); B/16's are about 1% of 1.1 TFLOP.
    (('--config.batch_size=4', '--config.model.variant=tiny', '--config.data.global_size=32',
      '--config.data.local_size=16'), (0.99, 1.25)),
    (('--config.model.variant=ViT-B-16', '--config.batch_size=2', '--config.data.global_size=224',
      '--config.data.local_size=96'), (0.99, 1.05)),
])
def test_analytic_flops_against_the_traced_step_and_xla(overrides, xla_ratio):
  config = _config(*overrides)
  traced, build = _traced_step(config)
  counts = flops_lib.train_step_flops(build.model, flops_lib.step_shape(config))
  analytic = counts['executed']
  # Matmuls of the program: below the analytic count by the patch embedding's input gradient
  # (never computed; 0.26% of tiny, 0.13% of B/16) and the teacher side of the distillation
  # logits' gradient; above it by the loss pairs' remat recompute (under 0.01%).
  ratio = jaxpr_matmul_flops(traced.jaxpr.jaxpr) / analytic
  assert 0.995 < ratio <= 1.0, ratio
  # XLA's HLO cost analysis (of the lowered module: compiling B/16 takes over a minute on two
  # cores) adds every elementwise op, so it is at least the matmul count and a little more.
  cost = traced.lower().cost_analysis()
  lo, hi = xla_ratio
  assert lo < cost['flops'] / analytic < hi, cost['flops'] / analytic


def test_clip_only_step_has_no_teacher_or_local_crops():
  cosmos = flops_lib.train_step_flops(models.get_variant('tiny'), flops_lib.StepShape(4, 32, 16))
  clip = flops_lib.train_step_flops(models.get_variant('tiny', cosmos=False),
                                    flops_lib.StepShape(4, 32, 16))
  assert clip['teacher_forward'] == 0 and clip['by_part']['vision_local'] == 0
  assert clip['by_part']['text'] == cosmos['by_part']['text']
  assert 'cross_poolers' not in clip['by_part']


def test_matmul_peak_runs_on_every_mesh_device():
  mesh = partition.make_mesh((2, 1, 1), jax.devices()[:2])
  peak = matmul_peak(size=128, mesh=mesh, repeats=2)
  assert peak['devices'] == 2 and peak['size'] == 128 and peak['flops_per_s'] > 0


def test_parse_mesh():
  assert memory_lib.parse_mesh('16,4,1') == (16, 4, 1)
  assert memory_lib.parse_mesh('2x2x2') == (2, 2, 2)
  for bad in ('8,1', 'a,1,1', '0,1,1'):
    with pytest.raises(ValueError, match='mesh'):
      memory_lib.parse_mesh(bad)


def test_memory_table_is_per_device_and_reports_bad_batches():
  config = _config('--config.batch_size=8', '--config.mesh.preset=fsdp')
  fsdp, bad = memory_lib.memory_table(config, [(1, 8, 1), (3, 1, 1)])
  num_params = sum(x.size for x in jax.tree.leaves(
      jax.eval_shape(models.init_params, models.get_variant('tiny'), jax.random.key(0))))
  # The state is float32 params, teacher and two Adam moments: 16 bytes per parameter, of
  # which each of the 8 FSDP devices holds about an eighth (small leaves stay replicated).
  state_bytes = 16 * num_params
  assert state_bytes / 8 < fsdp['argument_bytes'] < state_bytes / 4
  assert fsdp['peak_bytes'] >= fsdp['argument_bytes'] and fsdp['temp_bytes'] > 0
  assert fsdp['devices'] == 8 and fsdp['global_batch'] == 8
  assert 'not divisible by the data-parallel size 3' in bad['error']


def test_memory_of_a_mesh_larger_than_this_process_compiles_in_a_child():
  config = _config('--config.batch_size=8')
  row, = memory_lib.memory_table(config, [(4, 4, 1)], per_device_batch=1)
  assert 'error' not in row, row
  assert row['devices'] == 16 and row['global_batch'] == 16 and row['backend'] == 'cpu'


def test_run_merges_the_official_step_and_the_speedup(monkeypatch, tmp_path):
  fake = types.ModuleType('cosmos_jax.bench.official')
  fake.time_official_step = lambda repo, config, repeats: {
      'official_step_s': 3.0, 'official_samples_per_s': 32 / 3.0}
  monkeypatch.setitem(sys.modules, 'cosmos_jax.bench.official', fake)
  # `from cosmos_jax.bench import official` reads the package attribute first, once imported.
  import cosmos_jax.bench
  monkeypatch.setattr(cosmos_jax.bench, 'official', fake, raising=False)
  monkeypatch.setattr(run_lib, 'bench_train_step', lambda config, repeats: {
      'train_step_s': 1.5, 'train_samples_per_s': 32 / 1.5, 'compile_s': 1.0, 'xla_flops': None,
      'memory_row': {'mesh': [8, 1, 1], 'devices': 8, 'error': 'not measured'}})
  monkeypatch.setattr(run_lib, 'matmul_peak', lambda dtype, **kw: {'flops_per_s': 1e12})
  out = tmp_path / 'bench.json'
  results = bench.run(_config(), str(out), skip=('memory', 'data', 'eval'),
                      official_repo=str(tmp_path))
  assert results['speedup_vs_official'] == pytest.approx(2.0)
  achieved = results['executed_flops_per_step'] / 1.5   # skipped work does not count
  assert results['executed_flops_per_step'] < results['model_flops_per_step']
  assert results['achieved_flops_per_s'] == pytest.approx(achieved)
  assert results['fraction_of_peak'] == pytest.approx(achieved / 1e12)
  # MFU: the model's count, the numerator the official step's fraction uses too.
  assert results['model_fraction_of_peak'] == pytest.approx(
      results['model_flops_per_step'] / 1.5 / 1e12)
  assert results['official_fraction_of_peak'] == pytest.approx(
      results['model_flops_per_step'] / 3.0 / 1e12)
  written = json.loads(out.read_text())
  assert written['machine']['device_count'] == jax.device_count() and written['date']
  table = bench.format_table(results)
  assert 'speedup vs official' in table and '2.00 x' in table and 'fraction of' in table
  assert 'model FLOPs (MFU)' in table


def test_run_rejects_unknown_sections_and_missing_official_checkout(tmp_path):
  with pytest.raises(ValueError, match='unknown bench sections'):
    bench.run(_config(), skip=('trian',))
  with pytest.raises(FileNotFoundError, match='official COSMOS checkout not found'):
    bench.run(_config(), official_repo=str(tmp_path / 'nope'))


def test_cli_bench_memory_only(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  assert cli.main(['bench', '--config', 'configs/demo.py', '--out', str(out),
                   '--skip', 'train,peak,data,eval', '--meshes', '2,2,2', '3x1x1',
                   '--config.batch_size=8']) == 0
  results = json.loads(out.read_text())
  assert results['model_flops_per_step'] > 0 and 'train_step_s' not in results
  good, bad = results['memory']
  assert good['mesh'] == [2, 2, 2] and good['peak_bytes'] > 0 and 'error' in bad
  printed = capsys.readouterr().out
  assert 'model FLOPs/step' in printed and 'per-device memory' in printed
  assert 'estimate for GPU/TPU' in printed


def test_data_parallelism_splits_the_activations():
  """8-way data parallelism leaves each device about 1/8 of the step's temporaries.

  Regression: merging views view-major, (V*B, ...), left the sharded sample axis minor, and
  XLA gathered the whole batch onto every device.
  """
  from cosmos_jax import config_cli
  from cosmos_jax.bench import memory
  config = config_cli.load_config_file('configs/demo.py')
  config.mesh.preset = 'dp'
  one = memory.compiled_memory(config, (1, 1, 1))
  eight = memory.compiled_memory(config, (8, 1, 1))
  assert 'error' not in one and 'error' not in eight
  assert eight['temp_bytes'] < 0.3 * one['temp_bytes'], (one['temp_bytes'], eight['temp_bytes'])


def test_data_pod_host_need_by_hand():
  # 4096 over 256 chips at 0.2 s: 80 samples/s a chip, 320 a 4-chip host; at 40 a core, 8.
  aot = {'global_batch': 4096, 'devices': 256, 'estimate': {'step_s': 0.2}, 'name': 'v5e-256'}
  need = data_pod.host_need(aot, per_core=40.0)
  assert need['host_samples_per_s'] == pytest.approx(320.0) and need['host_cores_needed'] == 8


def test_cli_data_pod_at_the_recipes_crop_sizes(tmp_path, capsys):
  """JPEG tar shards at 256-512 px through the B/16 recipe's pipeline (224 and 96 px crops)."""
  aot_json = tmp_path / 'aot.json'
  aot_json.write_text(json.dumps({'aot': {'global_batch': 4096, 'devices': 256, 'name': 'v5e-256',
                                          'estimate': {'step_s': 0.2}}}))
  out = tmp_path / 'pod.json'
  assert cli.main(['bench', '--config', 'configs/merged30m_vitb16.py', '--data-pod', '1',
                   '--data-batches', '1', '--aot-json', str(aot_json), '--json', str(out),
                   '--config.batch_size=4']) == 0
  r = json.loads(out.read_text())['data_pod']
  assert (r['crops'], r['image_sizes'], r['workers']) == ('2 x 224 + 6 x 96', [256, 384, 512], 1)
  assert r['samples_per_s_per_core'] > 0 and r['samples_per_s_workers'] > 0
  # Without a checkout the official figure is the recorded one, and says so.
  assert not r['official_measured'] and r['official_source'].startswith('recorded ')
  assert r['official_samples_per_s_per_core'] == data_pod.OFFICIAL_SAMPLES_PER_S_PER_CORE
  assert r['augment_samples_per_s_per_core'] > 0
  assert r['vs_official_per_core'] == pytest.approx(
      r['augment_samples_per_s_per_core'] / data_pod.OFFICIAL_SAMPLES_PER_S_PER_CORE)
  assert r['pipeline_vs_official_per_core'] == pytest.approx(
      r['samples_per_s_per_core'] / data_pod.OFFICIAL_SAMPLES_PER_S_PER_CORE)
  assert r['host_cores_needed'] == math.ceil(320.0 / r['samples_per_s_per_core'])
  assert "the official code's" in capsys.readouterr().out


def test_official_crop_scale_of_the_recipe_and_a_config_it_cannot_express():
  from cosmos_jax.bench import augment_rate
  config = config_cli.load_config_file('configs/merged30m_vitb16.py')
  assert augment_rate.official_crop_scale(config.data) == 0.4   # --crop-scale 0.4
  config.data.local_size = 64
  with pytest.raises(ValueError, match='96 px locals.*64 px'):
    augment_rate.official_crop_scale(config.data)


def test_official_augment_timer_refuses_a_folder_without_their_code(tmp_path):
  from cosmos_jax.bench import augment_rate
  config = config_cli.load_config_file('configs/merged30m_vitb16.py')
  with pytest.raises(FileNotFoundError, match='not a checkout'):
    augment_rate.augment_rates([], config, official_repo=str(tmp_path))
