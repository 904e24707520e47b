"""The real `cosmos-jax` program in subprocesses: each failure is one line on stderr with the
right exit code, no traceback unless --debug, and the traceback in WORKDIR/train.log."""

import errno
import os
import re
import subprocess
import sys

import pytest

from cosmos_jax import cli
from cosmos_jax.bench.memory import cpu_devices_env

from test_loop import SMALL_TOWERS

ROOT = os.path.join(os.path.dirname(__file__), '..')
DEMO = os.path.join(ROOT, 'configs', 'demo.py')
# The tiny model on 8 fake CPU devices, small enough to compile in seconds.
TINY = ['--config.batch_size=8', '--config.mesh.shape=(8,1,1)', '--config.log_every_steps=1',
        '--config.data.synthetic.image_size=32', '--config.data.synthetic.num_train=16',
        '--config.data.synthetic.num_val=8', '--config.eval.every_steps=0',
        '--config.eval.batch_size=8', '--config.optim.warmup_steps=0', *SMALL_TOWERS]


def _cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = cpu_devices_env(8)
  return subprocess.run([sys.executable, '-m', 'cosmos_jax.cli', *argv], capture_output=True,
                        text=True, timeout=timeout, env=env, cwd=ROOT)


def _error_line(proc: subprocess.CompletedProcess, command: str, code: int,
                only_line: bool = True) -> str:
  """The one error line; ``only_line``: nothing else on stderr either."""
  assert proc.returncode == code, proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith(f'cosmos-jax {command}: error: ')]
  assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
  if only_line:
    assert len(lines) == 1, proc.stderr
  return errors[0]


def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys):
  line = _error_line(_cli('train', '--config', DEMO, '--workdir', str(tmp_path / 'w'),
                          '--config.optim.nope=1'), 'train', 2)
  assert "unknown config field 'optim.nope'" in line
  # The log file has the traceback that stderr does not.
  log = (tmp_path / 'w' / 'train.log').read_text()
  assert 'Traceback' in log and "unknown config field 'optim.nope'" in log
  with pytest.raises(SystemExit) as e:   # argparse's own errors: one line too, no usage block
    cli.main(['train', '--config', DEMO])
  assert e.value.code == 2
  assert capsys.readouterr().err == ('cosmos-jax train: error: the following arguments are '
                                     'required: --workdir (see cosmos-jax train --help)\n')


def test_debug_prints_the_traceback_before_the_line(tmp_path, capsys):
  proc = _cli('train', '--debug', '--config', 'nowhere.py', '--workdir', str(tmp_path / 'w'))
  assert proc.returncode == 2
  assert 'Traceback (most recent call last)' in proc.stderr
  assert 'FileNotFoundError: config file not found' in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'cosmos-jax train: error: config file not found: nowhere.py')
  assert cli.main(['train', '--config', 'nowhere.py', '--workdir', str(tmp_path / 'w')]) == 2
  assert capsys.readouterr().err == 'cosmos-jax train: error: config file not found: nowhere.py\n'
  assert cli.main(['--debug', 'train', '--config', 'nowhere.py', '--workdir', str(tmp_path)]) == 2
  assert 'Traceback' in capsys.readouterr().err


def test_convert_refuses_to_overwrite(tmp_path, capsys):
  src, dst = tmp_path / 'a.pt', tmp_path / 'b.pt'
  src.write_bytes(b'not a checkpoint')
  dst.write_bytes(b'precious')
  line = _error_line(_cli('convert', str(src), str(dst)), 'convert', 2)
  assert line == f'cosmos-jax convert: error: {dst} exists; pass --overwrite to replace it (or choose another path)'

  def error(*argv):
    assert cli.main(['convert', *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err
    return err
  assert 'is (or holds) the source' in error(src, src, '--overwrite')
  (tmp_path / 'params').mkdir()
  (tmp_path / 'params' / 'x').write_text('')
  assert 'not empty; pass --overwrite' in error(src, tmp_path / 'params')
  # With --overwrite it goes on to read the source, which is no checkpoint: still one line.
  error(src, dst, '--overwrite')
  assert dst.read_bytes() == b'precious' and src.read_bytes() == b'not a checkpoint'


def test_convert_without_torch_names_the_extra(tmp_path, capsys, monkeypatch):
  """PyTorch is an optional extra: a .pt file without it is one line that says how to get it."""
  monkeypatch.setitem(sys.modules, 'torch', None)   # `import torch` raises ImportError
  src = tmp_path / 'a.pt'
  src.write_bytes(b'not a checkpoint')
  assert cli.main(['convert', str(src), str(tmp_path / 'params')]) == 2
  err = capsys.readouterr().err
  assert err == (f'cosmos-jax convert: error: {src}: PyTorch is needed to read a .pt file and '
                 "is not installed: pip install 'cosmos_jax[torch]' (or read a .safetensors "
                 'file, which needs no torch)\n')


def test_full_disk_is_a_run_error(tmp_path):
  """The shard is written through a link to /dev/full: every write fails with ENOSPC."""
  if not os.path.exists('/dev/full'):
    pytest.skip('no /dev/full here')
  out = tmp_path / 'shards'
  out.mkdir()
  os.symlink('/dev/full', out / 'synthetic-val-0000.tar.tmp')
  line = _error_line(_cli('data', 'synthetic', str(out), '--split', 'val', '--num', '2',
                          '--image-size', '16'), 'data', 1)
  assert line == ('cosmos-jax data: error: No space left on device: free some space (or use a '
                  'path on a larger disk) and run again; a training run resumes from its last '
                  'checkpoint')


def test_empty_shard_names_its_path(tmp_path):
  shard = tmp_path / 'empty.tar'
  shard.write_bytes(b'')
  workdir = tmp_path / 'w'
  proc = _cli('train', '--config', DEMO, '--workdir', str(workdir),
              f'--config.data.train={shard}', *TINY)
  line = _error_line(proc, 'train', 2, only_line=False)
  assert f'the source {shard} has 0 records' in line and 'empty file (0 bytes)' in line
  log = (workdir / 'train.log').read_text()
  assert 'Traceback' in log and 'WARNING' in log and f'shard {shard}: empty file' in log


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / 'file').write_text('')
  for workdir in (tmp_path / 'file', tmp_path / 'file' / 'below'):
    proc = _cli('train', '--config', DEMO, '--workdir', str(workdir), *TINY)
    line = _error_line(proc, 'train', 2, only_line=False)
    assert str(tmp_path / 'file') in line


@pytest.mark.slow
def test_train_logs_its_resume_on_the_console(tmp_path):
  """Two tiny runs (one step to compile, then a resume that has no step left; 7 min on 2 cores
  shared with other work, about a minute alone): the resume's INFO line shows on the console,
  the libraries' INFO records do not. Slow, but the only check of the logging as a user runs it."""
  workdir = str(tmp_path / 'run')
  argv = ['train', '--config', DEMO, '--workdir', workdir, '--config.total_steps=1',
          '--config.eval.tasks=()', *TINY]
  first = _cli(*argv, timeout=600)
  assert first.returncode == 0, first.stderr
  assert 'completed at step 1' in first.stdout
  second = _cli(*argv, timeout=600)
  assert second.returncode == 0, second.stderr
  assert 'INFO resumed from step 1' in second.stderr
  log = open(os.path.join(workdir, 'train.log')).read()
  assert log.count('resumed from step 1') == 1 and log.count('cosmos-jax train --config') == 2
  # The file keeps the libraries' INFO records; the console shows none of them.
  library_info = [m.group(2) for m in re.finditer(r' INFO ((?:absl|orbax|jax)[\w.]*): (.+)', log)]
  assert library_info and not any(text in second.stderr for text in library_info)


def _raised_in(filename: str, exc: BaseException) -> BaseException:
  """``exc`` with a traceback whose innermost frame is in ``filename``."""
  code = compile('def fail(e):\n  raise e\n', filename, 'exec')
  scope = {}
  exec(code, scope)  # pylint: disable=exec-used
  try:
    scope['fail'](exc)
  except BaseException as e:  # pylint: disable=broad-except
    return e


def test_exit_codes_and_lines_by_kind():
  from cosmos_jax import cli_output as O
  from cosmos_jax.errors import RunError, UsageError
  cases = [
      (UsageError('workdir x is a file'), 2, 'workdir x is a file'),
      (ValueError('unknown config field'), 2, 'unknown config field'),
      (RunError('step 6: the loss is nan\n  clip_loss=nan'), 1,
       'step 6: the loss is nan; clip_loss=nan'),
      (OSError(errno.EACCES, 'Permission denied', '/ro/run'), 1,
       '/ro/run: Permission denied: make it writable (or readable) for this user, or choose '
       'another path'),
      (ValueError('NOT_FOUND: Error opening "zarr" driver'), 1,
       'ValueError: NOT_FOUND: Error opening "zarr" driver (raised inside a library; the '
       'traceback: rerun with --debug)'),
      (_raised_in('/env/site-packages/orbax/checkpoint/x.py', ValueError('bad tree')), 1,
       'ValueError: bad tree (raised inside a library; the traceback: rerun with --debug)'),
      (KeyError('state'), 1, "KeyError: 'state' (an unexpected error, please report it with "
       'the traceback: rerun with --debug)'),
      (FloatingPointError('non-finite loss at step 6: clip_loss=nan'), 1,
       'non-finite loss at step 6: clip_loss=nan'),
      (KeyboardInterrupt(), 130, 'interrupted'),
  ]
  for exc, code, line in cases:
    assert (O.exit_code(exc), O.one_line(exc)) == (code, line), exc
  long = O.one_line(RunError('x' * 2000), log_path='w/train.log')
  assert long == 'x' * O.MAX_MESSAGE_CHARS + ' ... (the whole message: --debug, or w/train.log)'


def test_a_real_orbax_failure_is_a_run_error(tmp_path):
  import orbax.checkpoint as ocp
  from cosmos_jax import cli_output as O
  try:
    ocp.StandardCheckpointer().restore(str(tmp_path / 'no_checkpoint_here'))
  except Exception as e:  # pylint: disable=broad-except
    exc = e
  assert O.exit_code(exc) == 1
  assert O.one_line(exc).startswith(type(exc).__name__ + ': ')
