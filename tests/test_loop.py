"""The training loop end to end on the tiny model: files, resume, non-finite stop; config CLI."""

import json
import os

import pytest

from cosmos_jax import config_cli
from cosmos_jax.train import loop

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo.py')


def tiny_config(**overrides):
  config = config_cli.load_config_file(CONFIG)
  config.batch_size = 8
  config.total_steps = 4
  config.optim.warmup_steps = 1
  config.checkpoint.every_steps = 2
  config.log_every_steps = 1
  config.data.synthetic.image_size = 32
  config.data.synthetic.num_train = 64
  config.mesh.shape = (2, 2, 2)
  config.mesh.preset = 'fsdp_tp'
  for key, value in overrides.items():
    config_cli.apply_overrides(config, [f'--config.{key}={value}'])
  return config


def test_train_resume_and_non_finite_stop(tmp_path):
  workdir = str(tmp_path / 'run')
  result = loop.train(tiny_config(), workdir)
  assert result == {'step': 4, 'status': 'completed', 'metrics': result['metrics']}
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')))[-2:] == ['2', '4']
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps == [1, 2, 3, 4]

  # Resumed at step 4; an absurd learning rate makes step 6's loss non-finite.
  with pytest.raises(loop.NonFiniteLossError, match=r'non-finite loss at step 6: .*clip_loss='):
    loop.train(tiny_config(total_steps=6, **{'optim.lr': 1e12}), workdir)
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps == [1, 2, 3, 4, 5]       # resumed: steps 1-4 were not run again
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
