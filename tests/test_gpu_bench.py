"""The GPU benchmark: its batch search, parity check and figures, and its CPU path end to end.

The search and the parity arithmetic are checked against hand-made runners and arrays; the
whole benchmark runs on the tiny config (float32, the attention kernels that run on a CPU),
with MFU recomputed here from the FLOP count, the time and the peak.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cosmos_jax.bench import flops as flops_lib
from cosmos_jax.bench import gpu, gpu_search, gpu_trial
from cosmos_jax.train import optim
from cosmos_jax.train.from_config import model_config

ROOT = os.path.join(os.path.dirname(__file__), '..')
DEMO = os.path.join(ROOT, 'configs', 'demo.py')


# ---------------------------------------------------------------------------------------------
# The datasheet table: NVIDIA's bf16 dense figures (half the "with sparsity" ones).

@pytest.mark.parametrize('kind, tflops', [
    ('NVIDIA H100 80GB HBM3', 989), ('NVIDIA H100 PCIe', 756), ('NVIDIA H200', 989),
    ('NVIDIA A100-SXM4-80GB', 312), ('NVIDIA A100-PCIE-40GB', 312),
])
def test_datasheet_peaks_of_known_gpus(kind, tflops):
  assert gpu.datasheet_peak(kind) == tflops * 1e12


@pytest.mark.parametrize('kind', ['NVIDIA H100 NVL', 'NVIDIA H200 NVL', 'NVIDIA L4', 'cpu'])
def test_no_datasheet_peak_is_guessed(kind):
  assert gpu.datasheet_peak(kind) is None


# ---------------------------------------------------------------------------------------------
# The batch search, against runners whose memory limit is known.

def _runner(fits, log):
  """A trial that runs where ``fits(batch)``, else runs out of memory."""
  def run(batch):
    log.append(batch)
    ok = fits(batch)
    return {'batch': batch, 'ok': ok, 'oom': not ok, 'wall_s': 1.0}
  return run


def test_search_stops_at_the_cap():
  log = []
  found = gpu_search.search_batch(_runner(lambda b: True, log), 2, 4, math.inf)
  assert log == [2, 4]
  assert found['stopped_by'] == 'cap' and found['best']['batch'] == 4


def test_search_doubles_until_out_of_memory():
  log = []
  found = gpu_search.search_batch(_runner(lambda b: b <= 90, log), 32, 4096, math.inf)
  assert log == [32, 64, 128]
  assert found['stopped_by'] == 'oom' and found['best']['batch'] == 64


def test_search_halves_while_nothing_has_run():
  log = []
  found = gpu_search.search_batch(_runner(lambda b: b <= 10, log), 32, 4096, math.inf)
  assert log == [32, 16, 8]   # 8 ran and 16 did not: nothing left to try
  assert found['stopped_by'] == 'oom' and found['best']['batch'] == 8


def test_search_with_nothing_that_fits_reports_no_batch():
  log = []
  found = gpu_search.search_batch(_runner(lambda b: False, log), 4, 64, math.inf)
  assert log == [4, 2, 1] and found['best'] is None and found['stopped_by'] == 'oom'


def test_search_stops_at_an_error_that_is_not_memory():
  found = gpu_search.search_batch(
      lambda b: {'batch': b, 'ok': False, 'oom': False, 'error': 'boom'}, 2, 64, math.inf)
  assert len(found['trials']) == 1 and found['stopped_by'] == 'error'


def test_search_leaves_out_a_trial_that_would_overrun_the_budget():
  now = [0.0]

  def run(batch):
    now[0] += 10.0
    return {'batch': batch, 'ok': True, 'oom': False, 'wall_s': 10.0}
  # At t=10 the next trial would end at 10 + 1.25 * 10 = 22.5 <= 23: runs; at t=20, 32.5 > 23.
  found = gpu_search.search_batch(run, 2, 4096, 23.0, clock=lambda: now[0])
  assert [t['batch'] for t in found['trials']] == [2, 4]
  assert found['stopped_by'] == 'budget'


def test_search_takes_the_given_estimate_before_its_first_trial():
  found = gpu_search.search_batch(lambda b: pytest.fail('no trial fits'), 2, 64, 5.0,
                                  estimate_s=10.0, clock=lambda: 0.0)
  assert found == {'trials': [], 'best': None, 'stopped_by': 'budget'}


def test_memory_prediction_skips_only_powers_that_fit():
  # Memory: 10 fixed + 1 per sample (temporaries), limit 100: the search may plan up to 90%.
  def run(batch):
    ok = 10 + batch <= 100
    return {'batch': batch, 'ok': ok, 'oom': not ok, 'wall_s': 1.0, 'bytes_limit': 100,
            'compiled_memory': {'peak_bytes': 10 + batch, 'temp_bytes': batch}}
  predict = gpu_search.memory_prediction(cap=4096)
  assert predict(run(2)) == 64   # 10 + 64 <= 90 < 10 + 128
  jumped = gpu_search.search_batch(run, 2, 4096, math.inf, predict=predict)
  plain = gpu_search.search_batch(run, 2, 4096, math.inf)
  assert [t['batch'] for t in jumped['trials']] == [2, 64, 128]
  assert jumped['best']['batch'] == plain['best']['batch'] == 64
  assert predict({'batch': 2, 'bytes_limit': None, 'compiled_memory': {}}) is None


# ---------------------------------------------------------------------------------------------
# Fingerprints: the gradient read from Adam's first moment, and the relative errors.

def test_adam_first_moment_after_one_step_is_the_gradient_scaled():
  params = {'w': jnp.arange(6.0).reshape(2, 3), 'ln': {'bias': jnp.ones(3)}}
  grads = {'w': jnp.array([[0.5, -1.0, 2.0], [3.0, 0.0, -0.25]]), 'ln': {'bias': jnp.full(3, 0.1)}}
  b1 = 0.9
  tx, _ = optim.make_optimizer(1e-3, b1, 0.98, 1e-6, 0.2, 10, 100, grad_clip_norm=None)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  mu = gpu_trial.first_moment(state)
  for got, want in zip(jax.tree.leaves(mu), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(got) / (1 - b1), np.asarray(want), rtol=1e-6)


def test_first_moment_needs_exactly_one_adam_state():
  with pytest.raises(ValueError, match='one Adam state'):
    gpu_trial.first_moment(optax.sgd(0.1).init({'w': jnp.ones(2)}))


def _fingerprint(path, loss, **leaves):
  gpu_trial.save_fingerprint(str(path), loss, {k: np.asarray(v, np.float32) for k, v in leaves.items()})
  return str(path)


def test_relative_errors_against_numpy(tmp_path):
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((4, 5)), rng.standard_normal(7)
  da, db = 1e-3 * rng.standard_normal((4, 5)), 1e-2 * rng.standard_normal(7)
  ref = _fingerprint(tmp_path / 'ref.npz', 2.0, a=a, b=b)
  other = _fingerprint(tmp_path / 'other.npz', 2.01, a=a + da, b=b + db)
  errors = gpu_search.relative_errors(other, ref)
  a32, b32 = a.astype(np.float32), b.astype(np.float32)
  d = np.concatenate([((a + da).astype(np.float32) - a32).ravel(),
                      ((b + db).astype(np.float32) - b32).ravel()]).astype(np.float64)
  whole = np.concatenate([a32.ravel(), b32.ravel()]).astype(np.float64)
  assert errors['grads_rel_err'] == pytest.approx(np.linalg.norm(d) / np.linalg.norm(whole))
  assert errors['loss_rel_err'] == pytest.approx(0.01 / 2.0, rel=1e-6)
  leaf_b = np.linalg.norm((b + db).astype(np.float32) - b32) / np.linalg.norm(b32)
  assert errors['worst_leaf'] == 'b' and errors['worst_leaf_rel_err'] == pytest.approx(leaf_b)


def test_parity_at_the_largest_common_batch_and_its_tolerance(tmp_path):
  g = np.linspace(-1, 1, 10)
  ref = {2: _fingerprint(tmp_path / 'r2.npz', 1.0, g=g), 4: _fingerprint(tmp_path / 'r4.npz', 1.0, g=g),
         8: _fingerprint(tmp_path / 'r8.npz', 1.0, g=g)}
  close = {4: _fingerprint(tmp_path / 'c4.npz', 1.0, g=g * 1.01)}
  far = {2: _fingerprint(tmp_path / 'f2.npz', 1.0, g=g * 1.2),
         4: _fingerprint(tmp_path / 'f4.npz', 1.0, g=g * 1.2)}
  assert gpu_search.parity(ref, close)['batch'] == 4
  assert gpu_search.parity(ref, close)['ok']
  assert gpu_search.parity(ref, close)['grads_rel_err'] == pytest.approx(0.01, rel=1e-4)
  assert not gpu_search.parity(ref, far)['ok']
  assert gpu_search.parity(ref, {16: close[4]}) is None


def test_out_of_memory_is_recognised_in_xla_messages():
  assert gpu_trial.is_out_of_memory(
      'jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate '
      '81604378624 bytes.')
  assert not gpu_trial.is_out_of_memory('INVALID_ARGUMENT: shapes do not match')


def test_unknown_attention_or_batch_range_is_refused(tmp_path):
  config = gpu.bench_config(DEMO)
  with pytest.raises(ValueError, match='unknown attention'):
    gpu.run(str(tmp_path), config=config, attention=('flash',))
  with pytest.raises(ValueError, match='start <= cap'):
    gpu.run(str(tmp_path), config=config, attention=('xla',), start=8, cap=4)


def test_bench_config_is_bfloat16_on_one_device_unless_overridden():
  config = gpu.bench_config(DEMO)
  assert config.model.dtype == 'bfloat16' and tuple(config.mesh.shape) == (1, 1, 1)
  assert gpu.bench_config(DEMO, ['--config.model.dtype=float32']).model.dtype == 'float32'


def test_a_trial_process_reports_its_failure_as_a_result():
  """The subprocess path: a step that cannot be built comes back as JSON, not a crash."""
  config = gpu.bench_config(DEMO)
  config.model.variant = 'no-such-variant'
  result = gpu_trial.run_in_subprocess(gpu_trial.trial_spec(config, 'xla', 2, 1), timeout_s=120)
  assert result['ok'] is False and result['oom'] is False
  assert result['batch'] == 2 and 'no-such-variant' in result['error']
  assert result['platform'] == 'cpu'   # the child ran and answered in JSON


def test_the_parent_takes_no_device_before_the_trials():
  """On a GPU the trials' processes need its memory: importing the benchmark and building its
  config must not start a JAX backend (which would take 75% of the GPU's memory)."""
  probe = ('import jax._src.xla_bridge as xb\n'
           'from cosmos_jax.bench import gpu\n'
           f'gpu.bench_config({DEMO!r})\n'
           'print(xb.backends_are_initialized())\n')
  proc = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == 'False'


# ---------------------------------------------------------------------------------------------
# The CPU path end to end.

@pytest.mark.slow   # two trials of the tiny step (~25 s each on 2 cores): the real path
def test_cpu_path_end_to_end(tmp_path, monkeypatch):
  """The tiny config's CLIP-only step (half the COSMOS step's compile time; the trial code
  is the same), both kernels that run on a CPU, batch 2 with the cap at 2."""
  # The table's lookup on this machine's device kind ('cpu'), at a made-up peak.
  monkeypatch.setattr(gpu, 'DATASHEET_BF16_DENSE', (('cpu', 2e12),))
  scratch = tmp_path / 'scratch'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  config = gpu.bench_config(DEMO + ':clip', ['--config.model.dtype=float32'])
  results = gpu.run(str(tmp_path), config=config, attention=('xla', 'cpu_custom'), start=2,
                    cap=2, repeats=1, in_process=True, peak_size=256)
  with open(tmp_path / gpu.RESULT_FILE) as f:
    saved = json.load(f)
  assert saved['attention'].keys() == {'xla', 'cpu_custom'}
  assert saved['device']['datasheet_bf16_flops_per_s'] == 2e12
  assert saved['device']['datasheet_source'] == 'table'
  assert saved['device']['versions']['jax'] == jax.__version__
  measured = saved['measured_peak']['flops_per_s']
  assert measured > 0 and saved['measured_peak']['size'] == 256
  for name, impl in saved['attention'].items():
    assert impl['stopped_by'] == 'cap', name
    assert [t['batch'] for t in impl['trials']] == [2]   # nothing above the cap was tried
    best = impl['best']
    assert best['ok'] and best['batch'] == 2 and best['compile_s'] > 0
    assert math.isfinite(best['loss']) and best['grad_norm'] > 0
    assert best['samples_per_s'] == pytest.approx(2 / best['step_s'])
    shape = dataclasses.replace(flops_lib.step_shape(config), batch=2)
    model_flops = flops_lib.train_step_flops(model_config(config), shape)['total']
    assert best['mfu_datasheet'] == pytest.approx(model_flops / best['step_s'] / 2e12)
    assert best['mfu_measured_peak'] == pytest.approx(model_flops / best['step_s'] / measured)
    assert best['compiled_memory']['peak_bytes'] > 0
  check = saved['parity']['cpu_custom']
  assert check['batch'] == 2 and check['ok']
  assert check['loss_rel_err'] <= 1e-2 and check['grads_rel_err'] <= 5e-2
  table = gpu.format_summary(results, str(tmp_path))
  assert 'parity cpu_custom vs xla at batch 2' in table and 'cpu_custom' in table
  assert os.listdir(scratch) == []   # the fingerprints are removed


def test_the_script_refuses_to_run_without_wheels(tmp_path):
  env = {**os.environ, 'WHEELS': str(tmp_path / 'none')}
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'gpu_bench.sh'), 'run',
                         str(tmp_path / 'out')], capture_output=True, text=True, env=env)
  assert proc.returncode == 2 and 'gpu_bench.sh fetch' in proc.stderr
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'gpu_bench.sh'), 'bogus'],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "unknown step 'bogus'" in proc.stderr
