"""Checkpoints: round trip, exact resume after a hard kill, other meshes, SIGTERM, crashed saves.

DRIVER is a small training program. The tests import it to train in this process (8 fake
devices, one compile shared by the runs) and run it as a script where a process must die,
get a signal, or see a different number of devices.
"""

import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.bench.memory import cpu_devices_env
from cosmos_jax import models
from cosmos_jax.train import checkpoint, optim, partition, state as state_lib

CFG = models.get_variant('tiny')

DRIVER = textwrap.dedent("""
  \"\"\"python driver.py train|sigterm WORKDIR OUT STEPS [KILL_AFTER] | restore WORKDIR OUT\"\"\"
  import hashlib, json, os, signal, sys
  import jax, numpy as np
  from cosmos_jax import models
  from cosmos_jax.data import augment, pipeline, sources
  from cosmos_jax.train import checkpoint, optim, partition, state as state_lib, step as step_lib

  CONFIG = {'model': 'tiny', 'lr': 1e-3}


  def build(fake_step=False):
    \"\"\"The tiny model on a (1, n, 1) mesh; fake_step: a cheap stand-in for the COSMOS step.\"\"\"
    jax.config.update('jax_default_matmul_precision', 'highest')  # as tests/conftest.py
    cfg = models.get_variant('tiny')
    tx, schedule = optim.make_optimizer(1e-3, 0.9, 0.98, 1e-8, 0.1, warmup_steps=2,
                                        total_steps=50)
    mesh = partition.make_mesh((1, jax.device_count(), 1))  # params sharded over all devices
    rules = partition.resolve_rules('fsdp')
    shardings = state_lib.state_shardings(cfg, tx, mesh, rules)
    step_fn = step_lib.jit_train_step(
        step_lib.make_train_step(models.CLIP(cfg), tx, schedule,
                                 step_lib.StepConfig(ema_momentum=0.9)),
        shardings, partition.batch_sharding(mesh))
    if fake_step:  # compiles in a second instead of 20
      step_fn = jax.jit(lambda s, b: ({**s, 'step': s['step'] + 1}, {}), donate_argnums=0)
    return dict(cfg=cfg, tx=tx, mesh=mesh, rules=rules, step_fn=step_fn, fake_step=fake_step,
                target=state_lib.abstract_state(shardings, cfg, tx))


  def train(ctx, workdir, target_step, batch_log, save_every=1, kill_after=-1):
    \"\"\"Trains to target_step, resuming from workdir's latest checkpoint; SIGTERM stops it.\"\"\"
    ckpt = checkpoint.Checkpointer(workdir, save_every_steps=save_every, keep=2)
    it = pipeline.make_train_iterator(
        sources.open_source('synthetic:train', image_size=32, num_train=64),
        pipeline.PipelineConfig(global_batch_size=8, worker_count=0,
                                multicrop=augment.MultiCropConfig(global_size=32, local_size=16)))
    restored = ckpt.restore_or_none(ctx['target'])
    if restored is None and ctx['fake_step']:  # zeros: no init to compile
      state = jax.tree.map(lambda t: jax.device_put(np.zeros(t.shape, t.dtype), t.sharding),
                           ctx['target'])
    elif restored is None:
      state, _ = state_lib.create_state(ctx['cfg'], ctx['tx'], ctx['mesh'], ctx['rules'],
                                        jax.random.key(0))
    else:
      state, data_state, _ = restored
      it.set_state(data_state)
    flag = checkpoint.install_sigterm_handler()
    step = int(state['step'])
    data_sharding = partition.batch_sharding(ctx['mesh'])
    try:
      with jax.set_mesh(ctx['mesh']), open(batch_log, 'a') as log:
        while step < target_step:
          batch = next(it)
          keys = [str(k) for k in batch.pop('keys')]
          digest = hashlib.sha256(b''.join(batch[k].tobytes() for k in sorted(batch)))
          state, _ = ctx['step_fn'](state, jax.device_put(batch, data_sharding))
          step += 1
          ckpt.save(step, state, data_state=it.get_state(), config=CONFIG)
          log.write(json.dumps({'step': step, 'keys': keys, 'digest': digest.hexdigest()}))
          log.write('\\n')
          log.flush()
          print(f'step {step} done', flush=True)
          if step == kill_after:
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
          if checkpoint.should_stop(flag, step, ckpt):
            ckpt.save(step, state, data_state=it.get_state(), config=CONFIG, force=True)
            ckpt.wait()
            print(f'stopped at step {step}', flush=True)
            break
    finally:
      flag.uninstall()
      ckpt.close()
      it.close()
    return state


  def leaves(state):
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


  if __name__ == '__main__':
    mode, workdir, out = sys.argv[1:4]
    ctx = build(fake_step=mode == 'sigterm')
    if mode == 'restore':
      ckpt = checkpoint.Checkpointer(workdir)
      state, data_state, config = ckpt.restore(target=ctx['target'])
      same = jax.tree.map(lambda x, t: x.sharding == t.sharding, state, ctx['target'])
      assert all(jax.tree.leaves(same)), 'restored shardings differ from the target'
      print(json.dumps({'step': ckpt.latest_step(), 'data': data_state, 'config': config}))
    else:
      kill_after = int(sys.argv[5]) if len(sys.argv) > 5 else -1
      state = train(ctx, workdir, int(sys.argv[4]), out + '.batches.jsonl',
                    save_every=1 if mode == 'train' else 1000, kill_after=kill_after)
    np.savez(out, **leaves(state))
""")


def _start(script, *args, log, devices: int = 8) -> subprocess.Popen:
  env = cpu_devices_env(devices)
  with open(log, 'w') as f:  # a file, not a pipe that could fill up while we work
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env,
                            stdout=f, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log, returncode: int = 0, timeout: float = 300) -> str:
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  out = pathlib.Path(log).read_text()
  assert proc.returncode == returncode, f'exit {proc.returncode}\n{out[-5000:]}'
  return out


def _batches(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _assert_bitwise_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope='module')
def driver(tmp_path_factory):
  """The driver file and the module imported from it (its `build()` compiled once here)."""
  path = tmp_path_factory.mktemp('driver') / 'driver.py'
  path.write_text(DRIVER)
  spec = importlib.util.spec_from_file_location('checkpoint_test_driver', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return path, module


@pytest.fixture(scope='module')
def sigterm_run(driver, tmp_path_factory):
  """A subprocess training with save_every_steps=1000 that gets SIGTERM once step 2 is done.

  Its step only counts (the loop, the data and the saves are the real ones). Started before
  the other runs so that it overlaps them.
  """
  root = tmp_path_factory.mktemp('sigterm')
  log = root / 'log.txt'
  proc = _start(driver[0], 'sigterm', root / 'ckpt', root / 'out.npz', 10**6, log=log)

  def signal_after_step_2():
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
      if 'step 2 done' in log.read_text():
        proc.send_signal(signal.SIGTERM)
        return
      time.sleep(0.05)

  watcher = threading.Thread(target=signal_after_step_2, daemon=True)
  watcher.start()
  yield proc, root, watcher
  if proc.poll() is None:
    proc.kill()


@pytest.fixture(scope='module')
def resume_runs(driver, sigterm_run, tmp_path_factory):
  """Run A: 6 steps straight. Run B: 3 steps, SIGKILL, then resumed to step 6."""
  del sigterm_run  # only started early
  script, module = driver
  root = tmp_path_factory.mktemp('resume')
  b1 = _start(script, 'train', root / 'ckpt_b', root / 'b.npz', 6, 3, log=root / 'b1.txt')
  ctx = module.build()
  a = module.leaves(module.train(ctx, root / 'ckpt_a', 6, root / 'a.batches.jsonl',
                                 save_every=3))
  out = _finish(b1, root / 'b1.txt', returncode=-signal.SIGKILL)
  assert 'step 3 done' in out and 'step 4 done' not in out
  assert not (root / 'b.npz').exists()
  b = module.leaves(module.train(ctx, root / 'ckpt_b', 6, root / 'b.npz.batches.jsonl',
                                 save_every=3))
  np.savez(root / 'a.npz', **a)
  return root, a, b


@pytest.mark.xdist_group('checkpoint_trainer_runs')   # one set of trainer runs
@pytest.mark.slow   # real trainer processes, killed and resumed
def test_exact_resume_after_hard_kill(driver, resume_runs):
  root, a, b = resume_runs
  batches_a = _batches(root / 'a.batches.jsonl')
  batches_b = _batches(root / 'b.npz.batches.jsonl')  # steps 1-3 killed, 4-6 resumed
  assert [x['step'] for x in batches_b] == [1, 2, 3, 4, 5, 6]
  assert batches_a == batches_b  # the same records, crops and captions at every step
  assert any('teacher_params' in k for k in a) and any('opt_state' in k for k in a)
  _assert_bitwise_equal(a, b)
  assert int(a["['step']"]) == 6
  # Step 3 of run A was written while step 4 ran on the donated state; run B waited for its
  # step 3 before dying. Equal: the save copied the state before returning.
  target = driver[1].build()['target']
  with checkpoint.Checkpointer(root / 'ckpt_a') as ckpt_a, \
       checkpoint.Checkpointer(root / 'ckpt_b') as ckpt_b:
    assert ckpt_a.all_steps() == ckpt_b.all_steps() == [3, 6]
    _assert_bitwise_equal(driver[1].leaves(ckpt_a.restore(3, target=target)[0]),
                          driver[1].leaves(ckpt_b.restore(3, target=target)[0]))


@pytest.mark.xdist_group('checkpoint_trainer_runs')   # one set of trainer runs
@pytest.mark.slow
def test_restore_on_fewer_devices(driver, resume_runs, tmp_path):
  """Run A's checkpoint, params sharded over 8 devices, restored on a mesh of 2 and of 1."""
  root = resume_runs[0]
  procs = {n: _start(driver[0], 'restore', root / 'ckpt_a', tmp_path / f'{n}.npz',
                     log=tmp_path / f'{n}.txt', devices=n) for n in (2, 1)}
  for n, proc in procs.items():
    info = json.loads(_finish(proc, tmp_path / f'{n}.txt').strip().splitlines()[-1])
    assert info['step'] == 6 and info['config'] == {'model': 'tiny', 'lr': 1e-3}
    assert info['data']['position'] == 6 * 8
    _assert_bitwise_equal(dict(np.load(tmp_path / f'{n}.npz')), dict(np.load(root / 'a.npz')))


@pytest.mark.xdist_group('checkpoint_trainer_runs')   # one set of trainer runs
def test_sigterm_saves_current_step_and_exits_cleanly(driver, sigterm_run):
  proc, root, watcher = sigterm_run
  out = _finish(proc, root / 'log.txt')
  watcher.join()
  stopped = [int(line.removeprefix('stopped at step ')) for line in out.splitlines()
             if line.startswith('stopped at step ')]
  assert len(stopped) == 1 and stopped[0] >= 2
  with checkpoint.Checkpointer(root / 'ckpt', save_every_steps=1000) as ckpt:
    assert ckpt.all_steps() == stopped  # the only save: save_every_steps is 1000
    state, data_state, _ = ckpt.restore(target=driver[1].build()['target'])
  assert int(state['step']) == stopped[0] and data_state['position'] == 8 * stopped[0]
  _assert_bitwise_equal(driver[1].leaves(state), dict(np.load(root / 'out.npz')))


# In-process tests on the 8 fake devices of conftest.


@pytest.fixture(scope='module')
def sharded_state():
  """A tiny-model state on a (2, 2, 2) mesh, every leaf random (no compile needed)."""
  tx, _ = optim.make_optimizer(1e-3, 0.9, 0.98, 1e-8, 0.1, warmup_steps=2, total_steps=50)
  mesh = partition.make_mesh((2, 2, 2))
  shardings = state_lib.state_shardings(CFG, tx, mesh, partition.resolve_rules('fsdp_tp'))
  shapes = jax.eval_shape(lambda: state_lib.init_state(CFG, tx, jax.random.key(0)))
  rng = np.random.default_rng(0)

  def random(x, sharding):
    if jnp.issubdtype(x.dtype, jnp.integer):
      value = rng.integers(0, 1000, x.shape).astype(x.dtype)
    else:
      value = rng.standard_normal(x.shape).astype(x.dtype)
    return jax.device_put(value, sharding)

  return jax.tree.map(random, shapes, shardings), shardings, tx


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_round_trip(sharded_state, tmp_path):
  state, shardings, tx = sharded_state
  expected = _host(state)
  data_state = {'version': 1, 'position': 56, 'seen': 56, 'skipped': 1,
                'last_bad': [['k', 'reason']], 'shard_index': 0, 'shard_count': 1}
  config = {'model': {'variant': 'tiny'}, 'optim': {'lr': 1e-3}}
  target = state_lib.abstract_state(shardings, CFG, tx)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_or_none(target) is None
    assert ckpt.save(7, state, data_state=data_state, config=config, force=True)
  on_disk = json.loads((tmp_path / '7' / 'data' / 'metadata').read_text())
  assert on_disk == {'process_count': 1, 'states': [data_state]}

  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 7
    restored, data, cfg = ckpt.restore_or_none(target)
    assert (data, cfg) == (data_state, config)
    assert jax.tree.map(lambda x: x.sharding, restored) == shardings
    same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), y), restored, expected)
    assert all(jax.tree.leaves(same))
    # Onto another mesh of the same devices: just another target.
    other = state_lib.state_shardings(CFG, tx, partition.make_mesh((8, 1, 1)),
                                      partition.resolve_rules('dp'))
    restored, _, _ = ckpt.restore(7, target=state_lib.abstract_state(other, CFG, tx))
    assert jax.tree.map(lambda x: x.sharding, restored) == other
    same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), y), restored, expected)
    assert all(jax.tree.leaves(same))


def test_save_schedule_and_keep(tmp_path):
  tree = lambda v: {'w': jnp.full((4,), float(v))}
  target = {'w': jax.ShapeDtypeStruct((4,), jnp.float32,
                                      sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  with checkpoint.Checkpointer(tmp_path, save_every_steps=2, keep=2) as ckpt:
    assert ckpt.save(7, tree(7), force=True)   # off schedule, forced
    assert not ckpt.save(7, tree(7), force=True)  # already saved: skipped, not an error
    assert not ckpt.save(9, tree(9))           # not a multiple of save_every_steps
    assert ckpt.save(10, tree(10)) and ckpt.save(12, tree(12), config={'a': 1})
  assert ckpt.all_steps() == [10, 12]          # keep=2 removed step 7
  with checkpoint.Checkpointer(tmp_path, save_every_steps=2, keep=2) as ckpt:
    state, data, cfg = ckpt.restore(10, target=target)
    assert float(state['w'][0]) == 10 and data is None and cfg is None
    assert ckpt.restore(target=target)[2] == {'a': 1}


CRASH = textwrap.dedent('''
  import os, signal, sys
  import jax, jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from cosmos_jax.train import checkpoint
  mesh = jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))
  sh = NamedSharding(mesh, P('x'))
  ckpt = checkpoint.Checkpointer(sys.argv[1], save_every_steps=1)
  ckpt.save(1, {'w': jax.device_put(jnp.full((64,), 1.0), sh)}, config={'step': 1})
  ckpt.wait()
  big = jax.device_put(jnp.full((4096, 8192), 2.0), sh)   # 128 MiB
  assert ckpt.save(2, {'w': big}, config={'step': 2})
  os.kill(os.getpid(), signal.SIGKILL)   # while step 2 is being written
''')


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
  script = tmp_path / 'crash.py'
  script.write_text(CRASH)
  workdir = tmp_path / 'ckpt'
  _finish(_start(script, workdir, log=tmp_path / 'log.txt'), tmp_path / 'log.txt',
          returncode=-signal.SIGKILL)
  leftovers = sorted(p.name for p in workdir.iterdir())
  assert len(leftovers) == 2 and leftovers[0] == '1', leftovers
  assert leftovers[1].startswith('2.orbax-checkpoint-tmp'), leftovers  # killed mid-write
  mesh = jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))
  target = {'w': jax.ShapeDtypeStruct((64,), jnp.float32,
                                      sharding=jax.sharding.NamedSharding(mesh, jax.P('x')))}
  ckpt = checkpoint.Checkpointer(workdir, save_every_steps=1)
  assert ckpt.latest_step() == 1
  state, _, cfg = ckpt.restore(target=target)
  assert cfg == {'step': 1} and np.array_equal(np.asarray(state['w']), np.ones(64))
  # The step can be saved again; the unfinalised directory is gone.
  assert ckpt.save(2, {'w': jnp.full((64,), 3.0)}, config={'step': 2})
  ckpt.close()
  assert sorted(p.name for p in workdir.iterdir()) == ['1', '2']
  assert checkpoint.Checkpointer(workdir).latest_step() == 2


def test_sigterm_handler_only_sets_a_flag():
  before = signal.getsignal(signal.SIGTERM)
  flag = checkpoint.install_sigterm_handler()
  try:
    assert not flag.requested and not checkpoint.should_stop(flag)
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested and checkpoint.should_stop(flag)
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGTERM) == before


MULTIHOST = textwrap.dedent('''
  import json, os, signal, sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from cosmos_jax.train import checkpoint
  process, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process)
  # After initialize, so that this handler, not the one of JAX's preemption service, gets it.
  flag = checkpoint.install_sigterm_handler()
  mesh = jax.make_mesh((4,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P('x'))
  values = np.arange(32, dtype=np.float32).reshape(8, 4)
  state = {'w': jax.make_array_from_callback((8, 4), sharding, lambda i: values[i])}
  ckpt = checkpoint.Checkpointer(workdir, save_every_steps=1000)
  for step in range(1, 100):
    if process == 1 and step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # only host 1 is told
    if checkpoint.should_stop(flag, step, ckpt):
      break
  ckpt.save(step, state, data_state={'position': 10 + process}, config={'c': 1}, force=True)
  ckpt.close()
  with checkpoint.Checkpointer(workdir) as ckpt:
    target = {'w': jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding)}
    restored, data, config = ckpt.restore(target=target)
  local = all(np.array_equal(np.asarray(s.data), values[s.index])
              for s in restored['w'].addressable_shards)
  print(json.dumps({'step': step, 'data': data, 'config': config, 'local_equal': local}))
''')


def test_two_processes_stop_together_and_keep_their_data_states(tmp_path):
  """Two CPU processes with 2 devices each on loopback: SIGTERM reaches only one of them."""
  script = tmp_path / 'multihost.py'
  script.write_text(MULTIHOST)
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  procs = [_start(script, i, port, tmp_path / 'ckpt', log=tmp_path / f'{i}.txt', devices=2)
           for i in range(2)]
  for i, proc in enumerate(procs):
    info = json.loads(_finish(proc, tmp_path / f'{i}.txt', timeout=120).strip().splitlines()[-1])
    assert info == {'step': 2, 'data': {'position': 10 + i}, 'config': {'c': 1},
                    'local_equal': True}
  on_disk = json.loads((tmp_path / 'ckpt' / '2' / 'data' / 'metadata').read_text())
  assert on_disk == {'process_count': 2, 'states': [{'position': 10}, {'position': 11}]}
