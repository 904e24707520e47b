"""Checkpoints that fail: damaged steps fall back, full disks and other models give one line.

A toy run (a float state whose every step depends on the state and on the step's "batch")
stands in for training where only the checkpoint logic is under test: resuming from the
wrong step, or with the wrong data position, changes its final state.
"""

import errno
import json
import os
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cosmos_jax import models
from cosmos_jax.errors import RunError, UsageError
from cosmos_jax.train import (checkpoint, checkpoint_diagnosis, checkpoint_integrity, optim,
                              partition, reporting)
from cosmos_jax.train import state as state_lib


def _mesh():
  return jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))


def _target():
  sh = NamedSharding(_mesh(), P('x'))
  return {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(_mesh(), P())),
          'w': jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=sh)}


@jax.jit
def _toy_step(state, position):
  batch = jnp.sin(jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) + position)
  return {'step': state['step'] + 1, 'w': state['w'] * 0.9 + 0.1 * jnp.tanh(state['w'] + batch)}


def _toy_run(directory, until: int, *, every: int = 2, fallback: bool = True):
  """Trains the toy state to ``until``, resuming from ``directory``; returns it on the host."""
  with checkpoint.Checkpointer(directory, save_every_steps=every, keep=5,
                               fallback=fallback) as ckpt:
    restored = ckpt.restore_or_none(_target())
    if restored is None:
      w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
      state = {'step': jnp.int32(0), 'w': jax.device_put(w, _target()['w'].sharding)}
      position = 0
    else:
      state, data_state, _ = restored
      position = data_state['position']
    while int(state['step']) < until:
      state = _toy_step(state, position)
      position += 1
      ckpt.save(int(state['step']), state, data_state={'position': position},
                config={'model': {'variant': 'toy'}})
  return {k: np.asarray(v) for k, v in jax.device_get(state).items()}


@pytest.fixture(scope='module')
def toy_runs(tmp_path_factory):
  """An uninterrupted run to step 6, and a workdir stopped at step 4 (checkpoints 2 and 4)."""
  root = tmp_path_factory.mktemp('toy')
  straight = _toy_run(root / 'straight', 6)
  _toy_run(root / 'stopped', 4)
  return root, straight


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and '/d/' in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, 'r+b') as f:
    f.truncate(path.stat().st_size // 2)


def _flip_bit(step_dir):
  path = _largest_data_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


DAMAGE = {
    'truncated data file': (_truncate, 'truncated'),
    'deleted state item': (lambda d: shutil.rmtree(d / 'state'), 'missing'),
    'deleted array metadata': (lambda d: (d / 'state' / '_METADATA').unlink(), 'missing'),
    'flipped bit': (_flip_bit, 'checksum'),
}


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_damaged_latest_step_falls_back_and_ends_bitwise_equal(toy_runs, tmp_path, caplog, kind):
  root, straight = toy_runs
  workdir = tmp_path / 'ckpt'
  shutil.copytree(root / 'stopped', workdir)
  damage, tag = DAMAGE[kind]
  damage(workdir / '4')
  resumed = _toy_run(workdir, 6)
  for key in straight:
    assert np.array_equal(resumed[key], straight[key]), key
  warnings = [r.getMessage() for r in caplog.records if 'is damaged' in r.getMessage()]
  assert len(warnings) == 1 and 'step 4' in warnings[0], warnings
  assert '\n' not in warnings[0]
  assert sorted(os.listdir(workdir / 'damaged')) == [f'4-{tag}']   # kept, out of the way
  assert sorted(s for s in os.listdir(workdir) if s.isdigit()) == ['2', '4', '6']


def test_no_fallback_is_an_error_and_moves_nothing(toy_runs, tmp_path):
  workdir = tmp_path / 'ckpt'
  shutil.copytree(toy_runs[0] / 'stopped', workdir)
  _flip_bit(workdir / '4')
  with pytest.raises(RunError, match=r'step 4 .* is damaged: state/.* does not match its '
                     r'SHA-256.*checkpoint\.fallback=True'):
    _toy_run(workdir, 6, fallback=False)
  assert not (workdir / 'damaged').exists() and (workdir / '4').is_dir()


def test_every_file_of_a_saved_step_is_recorded(toy_runs):
  step_dir = toy_runs[0] / 'straight' / '6'
  record = json.loads((step_dir / checkpoint_integrity.RECORD_NAME).read_text())['files']
  on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob('*') if p.is_file()}
  # Everything but the record itself and what orbax writes at the rename (its step metadata,
  # the step's commit marker).
  assert set(record) == on_disk - {checkpoint_integrity.RECORD_NAME, '_CHECKPOINT_METADATA',
                                   'commit_success.txt'}
  assert 'state/_METADATA' in record and 'data/metadata' in record
  assert checkpoint_integrity.verify(str(step_dir)) is None


def test_a_full_disk_stops_at_once_with_the_previous_checkpoint_intact(tmp_path, monkeypatch):
  directory = tmp_path / 'ckpt'
  target = _target()
  state = {'step': jnp.int32(1), 'w': jax.device_put(jnp.ones((64, 32)), target['w'].sharding)}
  ckpt = checkpoint.Checkpointer(directory, save_every_steps=1)
  assert ckpt.save(1, state, data_state={'position': 1})
  ckpt.wait()

  def no_space(step_dir):
    raise OSError(errno.ENOSPC, 'No space left on device', step_dir)
  monkeypatch.setattr(checkpoint_integrity, 'write_record', no_space)
  assert ckpt.save(2, {**state, 'step': jnp.int32(2)}, data_state={'position': 2})
  deadline = time.monotonic() + 30
  with pytest.raises(RunError) as caught:
    while time.monotonic() < deadline:   # what the loop does after every step
      ckpt.check()
      time.sleep(0.05)
  message = str(caught.value)
  assert '\n' not in message and isinstance(caught.value.__cause__, BaseException)
  # The state is 64 x 32 float32 plus an int32: 8196 bytes.
  assert 'step 2' in message and 'is full' in message and f'{8196 / 2**30:.2f} GiB' in message
  assert 'previous checkpoint (step 1) is intact' in message
  monkeypatch.undo()
  ckpt.close()
  assert sorted(os.listdir(directory)) == ['1']   # the partial step 2 is removed
  with checkpoint.Checkpointer(directory) as again:
    restored, data, _ = again.restore(target=target)
  assert data == {'position': 1} and np.array_equal(np.asarray(restored['w']), np.ones((64, 32)))


def _tiny_target(cosmos: bool):
  cfg = models.get_variant('tiny', cosmos=cosmos)
  tx, _ = optim.make_optimizer(1e-3, 0.9, 0.98, 1e-8, 0.1, warmup_steps=2, total_steps=50)
  mesh = partition.make_mesh((8, 1, 1))
  shardings = state_lib.state_shardings(cfg, tx, mesh, partition.resolve_rules('dp'),
                                        with_teacher=cosmos)
  return state_lib.abstract_state(shardings, cfg, tx, with_teacher=cosmos)


def test_resuming_another_model_names_the_config_fields(tmp_path):
  saved_target = _tiny_target(cosmos=True)
  state = jax.tree.map(lambda t: jax.device_put(np.zeros(t.shape, t.dtype), t.sharding),
                       saved_target)
  config = {'model': {'variant': 'tiny', 'cosmos': True}, 'batch_size': 8, 'total_steps': 4}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(4, state, config=config, force=True)
  with checkpoint.Checkpointer(tmp_path) as ckpt, pytest.raises(UsageError) as caught:
    ckpt.restore_or_none(_tiny_target(cosmos=False),
                         config={**config, 'model': {'variant': 'tiny', 'cosmos': False}})
  message = str(caught.value)
  assert '\n' not in message and 'holds another model' in message
  assert "model.cosmos: True -> False" in message and 'batch_size' not in message
  # The CLIP state is the COSMOS one less the teacher and the distillation parts.
  extra = len(jax.tree.leaves(saved_target)) - len(jax.tree.leaves(_tiny_target(cosmos=False)))
  assert f'{extra} arrays differ' in message and 'only there' in message
  assert not (tmp_path / 'damaged').exists() and (tmp_path / '4').is_dir()   # not damage


@pytest.mark.parametrize('make,message', [
    (lambda p: p.write_text('x'), 'is a file'),
    (lambda p: (p.parent / 'file').write_text('x'), 'lies under'),
])
def test_unusable_workdir_is_one_usage_error(tmp_path, make, message):
  workdir = tmp_path / 'run'
  make(workdir)
  target = workdir if message == 'is a file' else tmp_path / 'file' / 'run'
  with pytest.raises(UsageError, match=message):
    checkpoint.check_workdir_writable(str(target))


def test_read_only_mount_is_one_usage_error(tmp_path, monkeypatch):
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, 'Read-only file system')
  monkeypatch.setattr(checkpoint_diagnosis.tempfile, 'TemporaryFile', read_only)
  with pytest.raises(UsageError, match=r'run is not writable \(Read-only file system\)'):
    checkpoint.check_workdir_writable(str(tmp_path / 'run'))


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only directories')
def test_read_only_workdir_is_one_usage_error(tmp_path):
  (tmp_path / 'run').mkdir()
  os.chmod(tmp_path / 'run', 0o500)
  try:
    with pytest.raises(UsageError, match='is not writable'):
      checkpoint.check_workdir_writable(str(tmp_path / 'run'))
  finally:
    os.chmod(tmp_path / 'run', 0o700)


def test_resumed_log_drops_rows_past_the_resumed_step(tmp_path):
  """Two kills: rows 1-7 written, resumed at 4; rows 5-9 written, resumed at 6; then to 10."""
  def run(start, stop, resume_at=None):
    log = reporting.RunLog(str(tmp_path), enabled=True, start_step=start)
    for step in range(start + 1, stop + 1):
      log.write(step, {'total_loss': float(step)})
    log.close()
    return log.dropped_rows
  assert run(0, 7) == 0
  assert run(4, 9) == 3
  assert run(6, 10) == 3
  rows = reporting.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [r['step'] for r in rows] == list(range(1, 11))
  assert [r['total_loss'] for r in rows] == [float(s) for s in range(1, 11)]
  assert not (tmp_path / 'metrics.jsonl.tmp').exists()
  # TensorBoard: the resumed writers announce where they purge (a session START at step+1).
  purges = sorted(_session_starts(tmp_path / 'tensorboard'))
  assert purges == [1, 5, 7], purges


def test_data_counters_for_the_log():
  """One host: its counters as they are, the fraction worked by hand (2 of 40)."""
  assert reporting.data_counters({'seen': 40, 'skipped': 2, 'source_missing': 49}) == {
      'data/seen': 40, 'data/skipped': 2, 'data/bad_fraction': 0.05, 'data/source_missing': 49}


def _session_starts(directory):
  import struct
  from tensorboardX.proto import event_pb2
  steps = []
  for name in os.listdir(directory):
    with open(directory / name, 'rb') as f:
      while header := f.read(12):
        (length,) = struct.unpack('<Q', header[:8])
        event = event_pb2.Event.FromString(f.read(length))
        f.read(4)
        if event.HasField('session_log') and event.session_log.status == 1:   # START
          steps.append(event.step)
  return steps


def test_a_reader_creates_removes_and_moves_nothing(toy_runs, tmp_path):
  directory = tmp_path / 'ckpt'
  shutil.copytree(toy_runs[0] / 'stopped', directory)
  in_progress = directory / '6.orbax-checkpoint-tmp'   # a live run's save being written
  (in_progress / 'state').mkdir(parents=True)
  _flip_bit(directory / '4')
  before = sorted(str(p.relative_to(directory)) for p in directory.rglob('*'))
  with checkpoint.Checkpointer(directory, read_only=True) as reader:
    assert reader.all_steps() == [2, 4]
    state, data, _ = reader.restore_or_none(_target())   # step 4 is skipped, not moved
    assert int(state['step']) == 2 and data == {'position': 2}
    with pytest.raises(RuntimeError, match='read-only'):
      reader.save(8, state, force=True)
  assert sorted(str(p.relative_to(directory)) for p in directory.rglob('*')) == before
  with pytest.raises(FileNotFoundError):
    checkpoint.Checkpointer(tmp_path / 'absent', read_only=True)
  assert not (tmp_path / 'absent').exists()
