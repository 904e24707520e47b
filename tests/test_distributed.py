"""Multi-host start-up: the environment contract, and a real 2-process CPU run vs 1 process."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from cosmos_jax.train import distributed, partition

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / 'launch' / 'local.sh'
SLURM_PORT = 65535 - 2**12 + 1 + 1234 % 2**12


@pytest.fixture
def fake_init(monkeypatch):
  """Records jax.distributed.initialize calls instead of joining a job."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(distributed, '_SUMMARY', None)
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: False)
  for name in list(os.environ):
    if name.startswith(('COSMOS_', 'SLURM_', 'OMPI_', 'JAX_COORDINATOR', 'JAX_LOCAL')) or \
        name == 'CUDA_VISIBLE_DEVICES':
      monkeypatch.delenv(name)
  return calls


def _kwargs(coord, n, pid, ids=None):
  return {'coordinator_address': coord, 'num_processes': n, 'process_id': pid,
          'local_device_ids': ids, 'cluster_detection_method': 'deactivate'}


# ------------------------------------------------------------------------- env parsing

@pytest.mark.parametrize('nodelist, hosts', [
    ('a[1-3,5],b7', ['a1', 'a2', 'a3', 'a5', 'b7']),
    ('node[01-04,07]', ['node01', 'node02', 'node03', 'node04', 'node07']),
    ('node001', ['node001']),
    ('gpu-a100-[08-10],login1', ['gpu-a100-08', 'gpu-a100-09', 'gpu-a100-10', 'login1']),
    ('r[1-2]n[1-2]', ['r1n1', 'r1n2', 'r2n1', 'r2n2']),
])
def test_expand_nodelist(nodelist, hosts):
  assert distributed.expand_nodelist(nodelist) == hosts


def test_parse_tasks_per_node():
  assert distributed.parse_tasks_per_node('2(x3),1') == [2, 2, 2, 1]
  assert distributed.parse_tasks_per_node('8') == [8]
  with pytest.raises(ValueError):
    distributed.parse_tasks_per_node('2(3)')


def _slurm(**extra):
  env = {'SLURM_JOB_ID': '1234', 'SLURM_JOB_NODELIST': 'gpu[01-02,07]'}
  env.update({k: str(v) for k, v in extra.items()})
  return env


SLURM_CASES = {
    # One task per node with all 8 GPUs (the sbatch default).
    'per_node': (_slurm(SLURM_PROCID=2, SLURM_NTASKS=3, SLURM_NODEID=2, SLURM_LOCALID=0,
                        SLURM_STEP_TASKS_PER_NODE='1(x3)', CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'),
                 _kwargs(f'gpu01:{SLURM_PORT}', 3, 2, list(range(8)))),
    # One task per GPU, every task sees the node's 8 GPUs: it takes its own.
    'per_gpu': (_slurm(SLURM_PROCID=13, SLURM_NTASKS=24, SLURM_NODEID=1, SLURM_LOCALID=5,
                       SLURM_NTASKS_PER_NODE=8, CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'),
                _kwargs(f'gpu01:{SLURM_PORT}', 24, 13, [5])),
    # One task per GPU, bound by --gpus-per-task=1: the one GPU it sees is ordinal 0.
    'per_gpu_bound': (_slurm(SLURM_PROCID=13, SLURM_NTASKS=24, SLURM_LOCALID=5,
                             SLURM_TASKS_PER_NODE='8(x3)', CUDA_VISIBLE_DEVICES='5'),
                      _kwargs(f'gpu01:{SLURM_PORT}', 24, 13, [0])),
    # Two tasks per node of 8 GPUs: four each.
    'two_per_node': (_slurm(SLURM_PROCID=3, SLURM_NTASKS=6, SLURM_NODEID=1, SLURM_LOCALID=1,
                            SLURM_STEP_TASKS_PER_NODE='2(x3)', SLURM_GPUS_ON_NODE=8),
                     _kwargs(f'gpu01:{SLURM_PORT}', 6, 3, [4, 5, 6, 7])),
    # CUDA_VISIBLE_DEVICES=4-7 masks to ordinals 0-3; without it SLURM's physical ids hold.
    'masked': (_slurm(SLURM_PROCID=1, SLURM_NTASKS=3, SLURM_NTASKS_PER_NODE=1,
                      CUDA_VISIBLE_DEVICES='4,5,6,7', SLURM_STEP_GPUS='4,5,6,7'),
               _kwargs(f'gpu01:{SLURM_PORT}', 3, 1, [0, 1, 2, 3])),
    'step_gpus': (_slurm(SLURM_PROCID=1, SLURM_NTASKS=3, SLURM_STEP_GPUS='4,5,6,7'),
                  _kwargs(f'gpu01:{SLURM_PORT}', 3, 1, [4, 5, 6, 7])),
    # A CPU job: no GPU information, every local device stays visible.
    'cpu': (_slurm(SLURM_PROCID=1, SLURM_NTASKS=2, CUDA_VISIBLE_DEVICES='NoDevFiles'),
            _kwargs(f'gpu01:{SLURM_PORT}', 2, 1, None)),
    # The step's nodelist wins over the job's; ports and addresses can be overridden.
    'step_nodelist_port': (_slurm(SLURM_PROCID=0, SLURM_NTASKS=2,
                                  SLURM_STEP_NODELIST='gpu[07-08]',
                                  COSMOS_COORDINATOR_PORT=4321),
                           _kwargs('gpu07:4321', 2, 0, None)),
    'explicit_address': (_slurm(SLURM_PROCID=1, SLURM_NTASKS=2,
                                COSMOS_COORDINATOR_ADDRESS='10.0.0.1:9999'),
                         _kwargs('10.0.0.1:9999', 2, 1, None)),
}


@pytest.mark.parametrize('case', list(SLURM_CASES))
def test_resolve_slurm(case):
  env, expected = SLURM_CASES[case]
  assert distributed.resolve(env) == ('slurm', expected)


def test_resolve_slurm_uneven_gpus_raises():
  env = _slurm(SLURM_PROCID=0, SLURM_NTASKS=6, SLURM_NTASKS_PER_NODE=3, SLURM_GPUS_ON_NODE=8)
  with pytest.raises(ValueError, match='cannot split'):
    distributed.resolve(env)


@pytest.mark.parametrize('env', [
    {},
    _slurm(SLURM_NTASKS=4),                        # a batch script / salloc shell, not srun
    _slurm(SLURM_PROCID=0, SLURM_NTASKS=1),        # a one-task job
    _slurm(SLURM_PROCID=0, SLURM_NTASKS=4, COSMOS_DISTRIBUTED='off'),
    {'COSMOS_NUM_PROCESSES': '1', 'COSMOS_PROCESS_ID': '0'},
])
def test_resolve_single_host(env):
  mode, kwargs = distributed.resolve(env)
  assert kwargs is None and mode in ('single', 'disabled')


def test_resolve_explicit():
  env = {'COSMOS_COORDINATOR_ADDRESS': 'host0:1234', 'COSMOS_NUM_PROCESSES': '4',
         'COSMOS_PROCESS_ID': '3', 'COSMOS_LOCAL_DEVICE_IDS': '0,1'}
  assert distributed.resolve(env) == ('explicit', _kwargs('host0:1234', 4, 3, [0, 1]))
  # JAX's own variables are read too; arguments win over the environment.
  env = {'JAX_COORDINATOR_ADDRESS': 'h:1', 'COSMOS_NUM_PROCESSES': '2', 'COSMOS_PROCESS_ID': '1'}
  assert distributed.resolve(env) == ('explicit', _kwargs('h:1', 2, 1))
  assert distributed.resolve(env, process_id=0) == ('explicit', _kwargs('h:1', 2, 0))
  # Explicit values also win inside SLURM.
  env.update(_slurm(SLURM_PROCID=5, SLURM_NTASKS=8))
  assert distributed.resolve(env) == ('explicit', _kwargs('h:1', 2, 1))


def test_resolve_incomplete_or_invalid_raises():
  with pytest.raises(ValueError, match='process_id not set'):
    distributed.resolve({'COSMOS_COORDINATOR_ADDRESS': 'h:1', 'COSMOS_NUM_PROCESSES': '2'})
  with pytest.raises(ValueError, match='not in'):
    distributed.resolve({'COSMOS_COORDINATOR_ADDRESS': 'h:1', 'COSMOS_NUM_PROCESSES': '2',
                         'COSMOS_PROCESS_ID': '2'})


def test_resolve_tpu_and_ompi():
  assert distributed.resolve({}, on_tpu_vm=True) == ('tpu', {})
  assert distributed.resolve({'OMPI_COMM_WORLD_SIZE': '4'}) == ('ompi', {})
  # JAX's detection fills in what is not given.
  env = {'JAX_COORDINATOR_ADDRESS': 'w0:8476'}
  assert distributed.resolve(env, on_tpu_vm=True) == ('tpu', {'coordinator_address': 'w0:8476'})


def test_initialize_single_host_is_a_no_op(fake_init):
  summary = distributed.initialize()
  assert fake_init == []
  assert summary['mode'] == 'single'
  assert (summary['process_index'], summary['process_count']) == (0, 1)
  assert summary['device_count'] == jax.device_count()
  assert distributed.is_primary()


def test_initialize_passes_kwargs_once_and_sets_cpu_collectives(fake_init, monkeypatch):
  updates = []
  monkeypatch.setattr(jax.config, 'update', lambda name, value: updates.append((name, value)))
  for name, value in _slurm(SLURM_PROCID=0, SLURM_NTASKS=2, COSMOS_CPU_COLLECTIVES='gloo',
                            COSMOS_INIT_TIMEOUT=60).items():
    monkeypatch.setenv(name, value)
  summary = distributed.initialize()
  assert fake_init == [dict(_kwargs(f'gpu01:{SLURM_PORT}', 2, 0), initialization_timeout=60)]
  assert updates == [('jax_cpu_collectives_implementation', 'gloo')]
  assert summary['mode'] == 'slurm' and summary['cpu_collectives'] == 'gloo'
  assert distributed.initialize() == summary   # idempotent
  assert len(fake_init) == 1


def test_host_local_batch_to_global_single_process():
  mesh = partition.make_mesh((8, 1, 1))
  sh = partition.batch_sharding(mesh)
  local = {'global': np.arange(8 * 6, dtype=np.uint8).reshape(8, 2, 3),
           'text': np.arange(16, dtype=np.int32).reshape(8, 2),
           'keys': np.array([f'k{i}' for i in range(8)]), 'meta': 'not an array'}
  out = distributed.host_local_batch_to_global(local, sh)
  assert set(out) == {'global', 'text'}
  for name, x in out.items():
    assert x.sharding == sh and x.dtype == local[name].dtype
    np.testing.assert_array_equal(np.asarray(x), local[name])


# --------------------------------------------------------------- real multi-process run

DRIVER = textwrap.dedent('''
  """Trains the tiny COSMOS 2 steps on a (8,1,1) mesh from this process's rows of the batch."""
  import sys

  import jax
  import numpy as np

  jax.config.update('jax_default_matmul_precision', 'highest')

  from cosmos_jax.train import distributed

  info = distributed.initialize()   # before anything touches the backend

  from cosmos_jax import models
  from cosmos_jax.train import optim, partition, state as state_lib, step as step_lib

  assert distributed.initialize() == info   # idempotent
  B = 8


  def make_batch(seed):
    rng = np.random.default_rng(seed)
    text = np.zeros((B, 8, 77), np.int32)
    for i in range(B):
      for v in range(8):
        n = int(rng.integers(1, 20))
        text[i, v, 0], text[i, v, n + 1] = 49406, 49407
        text[i, v, 1:n + 1] = rng.integers(1, 49406, n)
    return {'global': rng.integers(0, 256, (B, 2, 32, 32, 3), dtype=np.uint8),
            'local': rng.integers(0, 256, (B, 6, 16, 16, 3), dtype=np.uint8),
            'text': text, 'keys': np.array([f'sample{i}' for i in range(B)])}


  cfg = models.get_variant('tiny')
  mesh = partition.make_mesh((8, 1, 1))
  data_sh = partition.batch_sharding(mesh)
  # Adam eps 1e-5 as in the mesh-equivalence test: with 1e-8, an element whose gradient is
  # near zero turns the cross-process reduction-order noise (~1e-9) into a step of order lr.
  tx, schedule = optim.make_optimizer(1e-3, 0.9, 0.98, 1e-5, 0.5, warmup_steps=1,
                                      total_steps=10)
  state, shardings = state_lib.create_state(cfg, tx, mesh, partition.resolve_rules('fsdp'),
                                            jax.random.key(0))
  step = step_lib.jit_train_step(
      step_lib.make_train_step(models.CLIP(cfg), tx, schedule,
                               step_lib.StepConfig(ema_momentum=0.5)),
      shardings, data_sh)
  to_host = jax.jit(lambda t: t, out_shardings=partition.replicated(mesh))

  pid, per = jax.process_index(), B // jax.process_count()
  losses = []
  with jax.set_mesh(mesh):
    for i in range(2):
      full = make_batch(i)
      local = {k: v[pid * per:(pid + 1) * per] for k, v in full.items()}
      batch = distributed.host_local_batch_to_global(local, data_sh)
      assert set(batch) == {'global', 'local', 'text'}
      # Each process's rows land where the full batch has them.
      for k, x in to_host(batch).items():
        np.testing.assert_array_equal(np.asarray(x.addressable_data(0)), full[k])
      state, metrics = step(state, batch)
      losses.append(metrics['total_loss'])
    result = to_host({'losses': losses, 'params': state['params'],
                      'teacher': state['teacher_params'], 'step': state['step']})
  result = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), result)
  # The pipeline's counters are summed over the processes (process p: 2 * per + p seen, p bad).
  from cosmos_jax.train import reporting
  counters = reporting.data_counters({'seen': 2 * per + pid, 'skipped': pid})

  if distributed.is_primary():
    arrays = {f'{tree}/{jax.tree_util.keystr(path)}': leaf for tree in ('params', 'teacher')
              for path, leaf in jax.tree_util.tree_flatten_with_path(result[tree])[0]}
    np.savez(sys.argv[1], losses=np.stack(result['losses']), step=result['step'],
             process_count=info['process_count'], device_count=info['device_count'],
             local_device_count=info['local_device_count'], mode=info['mode'],
             counters=[counters['data/seen'], counters['data/skipped']], **arrays)
  print('driver done', info, flush=True)
''')


def _launch(args: list[str], log: pathlib.Path) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('COSMOS_', 'SLURM_', 'OMPI_', 'JAX_COORDINATOR', 'JAX_LOCAL'))}
  # A process group of its own, so that a timeout can stop local.sh and all it started.
  return subprocess.Popen(['bash', str(LOCAL_SH), *args], cwd=REPO, env=env,
                          stdout=log.open('w'), stderr=subprocess.STDOUT,
                          start_new_session=True)


def _finish(procs: dict[str, tuple[subprocess.Popen, pathlib.Path]], timeout: float) -> None:
  deadline = time.monotonic() + timeout
  try:
    for name, (proc, log) in procs.items():
      try:
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        pytest.fail(f'{name} run timed out after {timeout:.0f} s:\n{log.read_text()[-4000:]}')
      assert rc == 0, f'{name} run failed ({rc}):\n{log.read_text()[-4000:]}'
  finally:
    for proc, _ in procs.values():
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_local_sh_sets_the_contract_and_fails_fast(tmp_path):
  log_path = tmp_path / 'log'
  # Process 1 fails only once process 0's line is in the log: on a loaded machine process 0
  # could otherwise be stopped before it printed anything.
  script = ('echo "$COSMOS_PROCESS_ID/$COSMOS_NUM_PROCESSES $COSMOS_COORDINATOR_ADDRESS '
            '$COSMOS_CPU_COLLECTIVES $JAX_PLATFORMS $XLA_FLAGS"; '
            'if [ "$COSMOS_PROCESS_ID" = 1 ]; then '
            f'for i in $(seq 150); do grep -q "^\\[p0\\] " {log_path} && break; sleep 0.1; done; '
            'exit 3; fi; sleep 60')
  start = time.monotonic()
  proc = _launch(['--processes', '2', '--cpu-devices', '3', '--', 'bash', '-c', script],
                 log_path)
  try:
    rc = proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  log = log_path.read_text()
  assert rc == 3, log
  assert time.monotonic() - start < 20   # process 0 was stopped, not waited for
  for pid in (0, 1):
    line = next(l for l in log.splitlines() if l.startswith(f'[p{pid}] '))
    fields = line.split()
    assert fields[1] == f'{pid}/2' and fields[2].startswith('localhost:'), line
    assert fields[3:5] == ['gloo', 'cpu'], line
    # local.sh sets the device count and keeps the caller's other XLA flags.
    flags = fields[5:]
    assert [f for f in flags if 'device_count' in f] == [
        '--xla_force_host_platform_device_count=3'], line
    others = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
    assert [f for f in flags if 'device_count' not in f] == others, line


@pytest.mark.slow
def test_two_processes_on_loopback_match_one_process(tmp_path):
  driver = tmp_path / 'driver.py'
  driver.write_text(DRIVER)
  out1, out2 = tmp_path / 'one.npz', tmp_path / 'two.npz'
  # Both runs at once: each spends most of its time compiling on one core.
  procs = {
      'one-process': (_launch(['--processes', '1', '--cpu-devices', '8', '--',
                               sys.executable, str(driver), str(out1)], tmp_path / 'one.log'),
                      tmp_path / 'one.log'),
      'two-process': (_launch(['--processes', '2', '--cpu-devices', '4', '--',
                               sys.executable, str(driver), str(out2)], tmp_path / 'two.log'),
                      tmp_path / 'two.log'),
  }
  _finish(procs, timeout=300)

  one, two = np.load(out1), np.load(out2)
  assert (int(one['process_count']), int(one['device_count']), str(one['mode'])) == \
      (1, 8, 'single')
  assert (int(two['process_count']), int(two['local_device_count']),
          int(two['device_count']), str(two['mode'])) == (2, 4, 8, 'explicit')
  assert int(one['step']) == int(two['step']) == 2
  assert list(one['counters']) == [16, 0] and list(two['counters']) == [8 + 9, 0 + 1]
  np.testing.assert_allclose(two['losses'], one['losses'], rtol=0, atol=1e-5)
  names = [k for k in one.files if k.startswith(('params/', 'teacher/'))]
  assert len(names) > 20 and sorted(names) == sorted(
      k for k in two.files if k.startswith(('params/', 'teacher/')))
  for name in names:
    a, b = two[name], one[name]
    if 'in_proj_bias' in name:  # the key bias has zero gradient: Adam amplifies float noise
      third = a.shape[0] // 3
      a, b = np.delete(a, np.s_[third:2 * third]), np.delete(b, np.s_[third:2 * third])
    # 3e-5 is 1.5% of the two Adam steps (~2e-3 at lr 1e-3); Adam's sign-like first steps
    # lift the reduction-order noise of a near-zero gradient to about 1e-5 in rare elements,
    # while feeding any wrong rows would move parameters by the order of the steps themselves.
    np.testing.assert_allclose(a, b, rtol=0, atol=3e-5, err_msg=name)
  # The updates are far above the tolerance (the EMA teacher trails the student).
  diff = max(float(np.max(np.abs(one[n] - one['teacher/' + n[len('params/'):]])))
             for n in names if n.startswith('params/'))
  assert diff > 1e-4
  log = (tmp_path / 'two.log').read_text()
  assert '[p0]' in log and '[p1]' in log
