"""Real runs that are read, interrupted or resumed wrongly: a live trainer beside readers,
Ctrl-C once and twice, a resume at another batch size or with another model, two kills."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from cosmos_jax.bench.memory import cpu_devices_env
from cosmos_jax.errors import UsageError
from cosmos_jax.train import checkpoint, loop
from cosmos_jax.train.weights import load_for_eval

from test_loop import SMALL_TOWERS, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(devices: int) -> dict:
  return cpu_devices_env(devices)


def _steps(directory: pathlib.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _wait_for(predicate, proc, timeout: float, what: str, log: pathlib.Path):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f'{what} (exit {proc.poll()}):\n{log.read_text()[-4000:]}')
    time.sleep(0.1)


@pytest.mark.slow   # one real trainer (about a minute of compile on two loaded cores)
def test_readers_beside_a_live_trainer_leave_it_running_and_ctrl_c_saves(tmp_path):
  """The demo config saving every step; eval's reader opens the workdir five times meanwhile.

  Before readers were read-only, the trainer died at its next save (the reader's clean-up
  removed the step being written). Then one Ctrl-C: the current step is saved, exit 0.
  """
  workdir, log = tmp_path / 'run', tmp_path / 'train.log'
  ckpts = workdir / 'checkpoints'
  overrides = ['--config.checkpoint.every_steps=1', '--config.total_steps=100000',
               '--config.batch_size=8', '--config.log_every_steps=1',
               '--config.data.synthetic.num_train=64', '--config.data.synthetic.num_val=16',
               '--config.eval.every_steps=0', *SMALL_TOWERS]
  with open(log, 'w') as f:
    proc = subprocess.Popen([sys.executable, '-m', 'cosmos_jax.cli', 'train', '--config',
                             str(ROOT / 'configs' / 'demo.py'), '--workdir', str(workdir),
                             *overrides], env=_env(1), stdout=f, stderr=subprocess.STDOUT,
                            cwd=tmp_path)
  try:
    _wait_for(lambda: len(_steps(ckpts)) >= 2, proc, 600, 'the trainer saved no 2 steps', log)
    read = []
    for _ in range(5):
      config, params = load_for_eval(str(workdir))
      read.append(int(config.cosmos) and len(jax.tree.leaves(params)))
      assert proc.poll() is None, log.read_text()[-4000:]
    assert all(read)
    seen = _steps(ckpts)[-1]
    _wait_for(lambda: _steps(ckpts) and _steps(ckpts)[-1] >= seen + 2, proc, 300,
              'the trainer stopped saving after the reads', log)
    assert not [n for n in os.listdir(ckpts) if n == 'damaged']
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  out = log.read_text()
  assert proc.returncode == 0, out[-4000:]
  assert 'Traceback' not in out and 'No such file' not in out, out[-4000:]
  stopped = [line for line in out.splitlines() if line.startswith('interrupted at step ')]
  assert len(stopped) == 1, out[-3000:]
  step = int(stopped[0].split()[3].rstrip(':'))
  assert _steps(ckpts)[-1] == step   # the step it stopped at was saved
  with checkpoint.Checkpointer(ckpts, read_only=True) as ckpt:
    assert ckpt.read_config(step)['checkpoint']['every_steps'] == 1


SECOND_CTRL_C = textwrap.dedent('''
  import sys, time
  from cosmos_jax.train import checkpoint
  flag = checkpoint.install_stop_handlers()
  step = 0
  while not checkpoint.should_stop(flag, step):
    step += 1
    print(f'step {step}', flush=True)
    time.sleep(0.05)
  print(f'{flag.reason} at step {step}: saving', flush=True)
  time.sleep(float(sys.argv[1]))   # a long save
  print('saved', flush=True)
''')


@pytest.mark.parametrize('presses', [1, 2])
def test_first_ctrl_c_stops_cleanly_and_the_second_at_once(tmp_path, presses):
  script, log = tmp_path / 'run.py', tmp_path / 'log.txt'
  script.write_text(SECOND_CTRL_C)
  with open(log, 'w') as f:
    proc = subprocess.Popen([sys.executable, str(script), '60' if presses == 2 else '0.5'],
                            env=_env(1), stdout=f, stderr=subprocess.STDOUT)
  try:
    _wait_for(lambda: 'step 3' in log.read_text(), proc, 120, 'no step 3', log)
    proc.send_signal(signal.SIGINT)
    if presses == 2:
      # The loop's own line, not the handler's note (which also says "saving"): pressing
      # again after the note alone can kill the process before the loop has printed.
      _wait_for(lambda: 'interrupted at step' in log.read_text(), proc, 30, 'no save started',
                log)
      start = time.monotonic()
      proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  out = log.read_text()
  assert 'interrupted at step' in out and 'Ctrl-C again stops at once' in out
  if presses == 1:
    assert proc.returncode == 0 and 'saved' in out and 'Traceback' not in out, out
  else:
    assert proc.returncode == -signal.SIGINT and 'saved' not in out, out
    assert time.monotonic() - start < 20   # not the 60 s "save"


def _save_tiny_checkpoint(workdir: pathlib.Path, config) -> None:
  """A zero state of ``config``'s model saved as step 2 of ``workdir``, without compiling."""
  from cosmos_jax.train import from_config, partition
  mesh = partition.make_mesh(config.mesh.shape)
  target = from_config.build_train_step(config, mesh).abstract_state()
  state = jax.tree.map(lambda t: jax.device_put(np.zeros(t.shape, t.dtype), t.sharding), target)
  with checkpoint.Checkpointer(workdir / 'checkpoints') as ckpt:
    ckpt.save(2, state, config=config.to_dict(), force=True)


def test_resume_at_another_batch_size_is_refused_unless_allowed(tmp_path, caplog):
  workdir = tmp_path / 'run'
  _save_tiny_checkpoint(workdir, tiny_config())
  with pytest.raises(UsageError, match=r'saved at batch_size 8, this run has batch_size 16.*'
                     r'allow_batch_size_change=True'):
    loop.train(tiny_config(batch_size=16), str(workdir))
  saved = {'batch_size': 8}
  loop.check_batch_size_unchanged(tiny_config(**{'batch_size': 16,
                                                  'checkpoint.allow_batch_size_change': True}),
                                  saved)
  assert any('resuming anyway' in r.getMessage() for r in caplog.records)
  loop.check_batch_size_unchanged(tiny_config(), saved)   # the same: silent


def test_resume_with_another_model_variant_names_the_fields(tmp_path):
  workdir = tmp_path / 'run'
  _save_tiny_checkpoint(workdir, tiny_config())
  with pytest.raises(UsageError, match=r"holds another model.*model\.cosmos: True -> False"):
    loop.train(tiny_config(**{'model.cosmos': False, 'eval.which': 'student'}), str(workdir))
  assert _steps(workdir / 'checkpoints') == [2]   # not taken for damage


@pytest.mark.slow   # three short runs of the loop, each compiling the tiny step
def test_metrics_have_one_row_per_step_after_two_kills(tmp_path, capsys, monkeypatch):
  """A kill after a step's metrics but before its checkpoint leaves rows past the newest
  checkpoint; removing that step's checkpoint makes the same state as such a kill."""
  workdir = tmp_path / 'run'
  ckpts = workdir / 'checkpoints'
  should_stop = checkpoint.should_stop

  def run(stop_at):
    # Every run has the same config (the same schedule); it stops after `stop_at`
    # the way a SIGTERM does, saving that step.
    monkeypatch.setattr(checkpoint, 'should_stop', lambda flag, step, ckpt: (
        step == stop_at or should_stop(flag, step, ckpt)))
    config = tiny_config(total_steps=6)
    config.eval.tasks = ()
    return loop.train(config, str(workdir))
  run(3)                                   # checkpoints 2 and 3
  shutil.rmtree(ckpts / '3')               # "killed" before step 3 was saved
  run(5)                                   # resumes at 2: checkpoints 2, 4, 5
  assert 'resumed from step 2' in capsys.readouterr().out
  shutil.rmtree(ckpts / '5')
  result = run(None)                       # resumes at 4
  assert 'resumed from step 4' in capsys.readouterr().out
  assert result['step'] == 6
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
