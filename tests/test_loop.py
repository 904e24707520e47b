"""The training loop end to end on the tiny model: files, resume, non-finite stop; config CLI."""

import json
import os

import jax
import pytest

from cosmos_jax import config_cli, xla_cpu
from cosmos_jax.train import loop

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo.py')


# The 32 px `tiny` towers, not the demo's 64 px ones: a quarter of the image tokens to compile.
# Shared by the tests that train the demo config, in-process or through the CLI.
SMALL_TOWERS = ['--config.model.variant=tiny', '--config.data.synthetic.image_size=32',
                '--config.data.global_size=32', '--config.data.local_size=16']


def tiny_config(**overrides):
  config = config_cli.load_config_file(CONFIG)
  config.batch_size = 8
  config.total_steps = 4
  config.optim.warmup_steps = 1
  config.checkpoint.every_steps = 2
  config.log_every_steps = 1
  config_cli.apply_overrides(config, SMALL_TOWERS)
  config.data.synthetic.num_train = 64
  config.data.synthetic.num_val = 16
  config.eval.every_steps = 0          # only after the last step
  config.eval.which = 'both'
  config.eval.batch_size = 8
  config.mesh.shape = (8, 1, 1)          # sharded loops: test_train_resume_and_non_finite_stop
  config.mesh.preset = 'dp'
  for key, value in overrides.items():
    config_cli.apply_overrides(config, [f'--config.{key}={value}'])
  return config


def _tensorboard_tags(path):
  """Scalar tags in a TensorBoard event file, read with tensorboardX's own protobufs."""
  import struct
  from tensorboardX.proto import event_pb2
  tags = set()
  with open(path, 'rb') as f:
    while header := f.read(12):
      (length,) = struct.unpack('<Q', header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)   # the data's CRC
      tags.update(v.tag for v in event.summary.value)
  return tags


@pytest.mark.slow   # two runs of the loop on a (2, 2, 2) mesh
def test_train_resume_and_non_finite_stop(tmp_path):
  workdir = str(tmp_path / 'run')
  sharded = {'mesh.shape': '(2,2,2)', 'mesh.preset': 'fsdp_tp'}
  result = loop.train(tiny_config(**sharded), workdir)
  assert (result['step'], result['status']) == (4, 'completed')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')))[-2:] == ['2', '4']
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records] == [1, 2, 3, 4, 4]   # the last line: the evaluation
  assert {'total_loss', 'clip_loss', 'distill_loss', 'lr', 'steps_per_sec'} <= set(records[0])
  # The pipeline's counters: 8 records a step, none bad.
  assert [(r['data/seen'], r['data/skipped']) for r in records[:4]] == [
      (8, 0), (16, 0), (24, 0), (32, 0)]
  for tree in ('student', 'teacher'):
    r1 = records[-1][f'eval/{tree}/retrieval/synthetic/t2i_R@1']
    assert 0 <= r1 <= 100 and r1 == result['evaluations'][4][
        f'eval/{tree}/retrieval/synthetic/t2i_R@1']
    out = os.path.join(workdir, 'eval', 'step_4', tree)
    saved = json.load(open(os.path.join(out, 'results.json')))
    assert saved['retrieval']['synthetic']['t2i_R@1'] == r1
    assert {'retrieval_synthetic_val.png', 'results.md'} <= set(os.listdir(out))
    assert any(f.endswith('.png') for f in os.listdir(os.path.join(out, 'overlays_synthetic')))
  assert json.load(open(os.path.join(workdir, 'config.json')))['batch_size'] == 8
  events = os.listdir(os.path.join(workdir, 'tensorboard'))
  assert len(events) == 1 and events[0].startswith('events.out.tfevents')
  assert _tensorboard_tags(os.path.join(workdir, 'tensorboard', events[0])) >= {
      'train/total_loss', 'data/skipped', 'eval/teacher/retrieval/synthetic/t2i_R_1'}   # TensorBoard: @ -> _
  assert result['plots'] == os.path.join(workdir, 'plots', 'curves.png')
  assert open(result['plots'], 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

  # Resumed at step 4; an absurd learning rate makes step 6's loss non-finite.
  with pytest.raises(loop.NonFiniteLossError, match=r'non-finite loss at step 6: .*clip_loss='):
    loop.train(tiny_config(total_steps=6, **{'optim.lr': 1e12}, **sharded), workdir)
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps == [1, 2, 3, 4, 4, 5]    # resumed: steps 1-4 were not run again
  # The last good checkpoint stays the latest one.
  assert max(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()) == 4


@pytest.mark.parametrize('override,message', [
    ('--config.optim.lrr=1', "unknown config field 'optim.lrr'"),
    ('--config.optimizer.lr=1', "unknown config field 'optimizer'"),
    ('--config.batch_size=big', 'bad value for config.batch_size'),
    ('--config.mesh.shape=3', 'bad value for config.mesh.shape'),
    ('optim.lr=1', 'unrecognised argument'),
])
def test_config_overrides_name_the_bad_field(override, message):
  config = config_cli.load_config_file(CONFIG)
  with pytest.raises(ValueError, match=message):
    config_cli.apply_overrides(config, [override])


def test_config_values_are_validated_before_compiling():
  with pytest.raises(ValueError, match=r"config.model.dtype = 'float16'"):
    loop.train(tiny_config(**{'model.dtype': 'float16'}), 'unused')


def test_missing_config_file():
  with pytest.raises(FileNotFoundError, match='nope.py'):
    config_cli.load_config_file('configs/nope.py')


def test_missing_training_data_is_named(tmp_path):
  config = tiny_config()
  config.data.train = str(tmp_path / 'shards-{0000..0001}.tar')
  with pytest.raises(ValueError, match=r'shards-0000\.tar'):
    loop.train(config, str(tmp_path / 'run'))


@pytest.mark.slow   # two runs of the loop
def test_rehoming_the_state_after_the_first_step_changes_no_number(tmp_path, monkeypatch):
  """The loop hands the state to the backend once, after step 1 (``CpuTuning``); a backend
  that copies it there (XLA:CPU's huge-page re-homing) changes no number."""
  def losses(name):
    config = tiny_config(total_steps=3)
    config.eval.tasks = ()
    loop.train(config, str(tmp_path / name))
    records = [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')]
    return [r['total_loss'] for r in records if 'total_loss' in r]

  copies = []
  copy = lambda self, t: copies.append(1) or jax.tree.map(lambda a: a.copy(), t)
  monkeypatch.setattr(xla_cpu.CpuTuning, 'after_first_step', copy)
  rehomed = losses('rehomed')
  assert copies == [1]
  monkeypatch.undo()
  assert rehomed == losses('plain') and len(rehomed) == 3
