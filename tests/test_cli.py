"""The command line: demo, variants and convert, including their error paths."""

import numpy as np
import pytest

from cosmos_jax import cli


def test_similarity_prints_a_matrix(capsys):
  assert cli.main(['similarity', '--num', '3']) == 0
  out = capsys.readouterr().out
  assert 'model: tiny (COSMOS), random init' in out
  assert out.count('image ') == 3 and 'a photo of a red circle.' in out


def test_variants_lists_parameter_counts(capsys):
  assert cli.main(['variants']) == 0
  out = capsys.readouterr().out
  assert '152,382,466' in out and '154,039,042' in out


def test_convert_round_trip_and_demo_from_weights(tmp_path, torch_modules, capsys):
  torch, _ = torch_modules
  ref = pytest.importorskip('torch_reference')
  from cosmos_jax.models import get_variant
  model = ref.build(get_variant('tiny'))
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  torch.save({'epoch': 3, 'name': 'run', 'student': {'module.' + k: v for k, v in sd.items()},
              'teacher': sd}, tmp_path / 'official.pt')
  assert cli.main(['convert', str(tmp_path / 'official.pt'), str(tmp_path / 'params'),
                   '--variant', 'tiny']) == 0
  assert cli.main(['convert', str(tmp_path / 'params'), str(tmp_path / 'back.safetensors'),
                   '--layout', 'open_clip']) == 0
  from safetensors.numpy import load_file
  back = load_file(tmp_path / 'back.safetensors')
  assert len(back) == 62  # the tiny model's open_clip keys, COSMOS modules dropped
  np.testing.assert_array_equal(back['visual.proj'], sd['visual.proj'].numpy())
  capsys.readouterr()
  assert cli.main(['similarity', '--weights', str(tmp_path / 'params'), '--num', '2']) == 0
  assert 'weights ' in capsys.readouterr().out


@pytest.mark.parametrize('argv,message', [
    (['similarity', '--variant', 'ViT-Q-99'], "unknown model variant 'ViT-Q-99'"),
    (['convert', 'missing.pt', 'out'], 'missing.pt'),
    (['convert', 'a.txt', 'out'], 'neither a params directory'),
])
def test_errors_name_what_is_wrong(argv, message, capsys):
  assert cli.main(argv) == 2
  assert message in capsys.readouterr().err


def test_data_synthetic_then_convert_to_array_record(tmp_path, capsys):
  assert cli.main(['data', 'synthetic', str(tmp_path / 'shards'), '--split', 'val', '--num', '12',
                   '--image-size', '32', '--samples-per-shard', '5']) == 0
  out = capsys.readouterr().out
  assert 'wrote 12 samples in 3 shards' in out and '{0000..0002}' in out
  pattern = out.strip().split(': ', 1)[1]
  assert cli.main(['data', 'convert', pattern, str(tmp_path / 'ar')]) == 0
  from cosmos_jax.data.sources import open_source
  source = open_source(str(tmp_path / 'ar'))
  assert len(source) == 12 and not any('error' in source[i] for i in range(12))


def test_data_convert_names_a_missing_shard(tmp_path, capsys):
  assert cli.main(['data', 'convert', str(tmp_path / 'x-{0000..0001}.tar'), str(tmp_path / 'o')]) == 2
  assert 'x-0000.tar' in capsys.readouterr().err


def test_eval_on_synthetic_writes_results(tmp_path, capsys):
  out = tmp_path / 'eval'
  assert cli.main(['eval', '--task', 'synthetic', '--out', str(out), '--synthetic-num', '16',
                   '--synthetic-size', '32', '--batch-size', '16']) == 0
  import json
  results = json.loads((out / 'results.json').read_text())
  assert set(results) == {'retrieval', 'classification', 'segmentation'}
  assert 0 <= results['retrieval']['synthetic']['t2i_R@1'] <= 100
  assert (out / 'results.md').exists() and list(out.glob('retrieval_synthetic*.png'))
  assert list((out / 'overlays_synthetic').glob('*.png'))


@pytest.mark.parametrize('argv,message', [
    (['eval', '--checkpoint', 'no/such/run'], 'checkpoint not found: no/such/run'),
    (['eval', '--task', 'retrieval:coco=no/such/coco'], 'dataset folder not found: no/such/coco'),
    (['eval', '--task', 'retrieval:imagenet=.'], "unknown retrieval dataset 'imagenet'"),
    (['train', '--config', 'configs/demo.py', '--workdir', '{workdir}', '--config.optim.lrr=1'],
     "unknown config field 'optim.lrr'"),
    (['train', '--config', 'configs/demo.py', '--workdir', '{workdir}', '--config.batch_size=big'],
     'bad value for config.batch_size'),
    (['train', '--config', 'configs/demo.py', '--workdir', '{workdir}', '--config.optim.lr=-1'],
     'config.optim.lr = -1.0: must be positive'),
    (['train', '--config', 'configs/demo.py:bf16', '--workdir', '{workdir}'],
     "demo config argument must be '' or 'clip'"),
    (['train', '--config', 'configs/nope.py', '--workdir', '{workdir}'], 'config file not found'),
    (['train', '--config', 'configs/demo.py', '--workdir', '{workdir}',
      '--config.data.train=no/such/shard-{0000..0003}.tar'], 'no/such/shard-0000.tar'),
    (['train', '--config', 'configs/demo.py', '--workdir', '{workdir}',
      "--config.eval.tasks=('retrieval:coco=no/such/coco',)"],
     'dataset folder not found: no/such/coco'),
    (['train', '--config', 'configs/demo.py', '--workdir', 'gs://b/run'],
     'give a local or mounted path'),
    (['similarity', '--weights', 'no/such/run'], 'checkpoint not found: no/such/run'),
    (['demo', '--workdir', '{workdir}', '--config.optim.lrr=1'],
     "unknown config field 'optim.lrr'"),
])
def test_eval_and_train_errors(argv, message, capsys, tmp_path):
  argv = [a.replace('{workdir}', str(tmp_path / 'run')) for a in argv]
  assert cli.main(argv) == 2
  assert message in capsys.readouterr().err


def test_bench_reports_train_data_and_eval_throughput(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  assert cli.main(['bench', '--config', 'configs/demo.py', '--out', str(out), '--repeats', '1',
                   '--config.batch_size=8', '--config.data.synthetic.image_size=32',
  ]) == 0
  import json
  results = json.loads(out.read_text())
  for key in ('train_step_s', 'train_samples_per_s', 'data_samples_per_s', 'eval_images_per_s'):
    assert results[key] > 0
  assert 'eval images/s' in capsys.readouterr().out


def test_eval_retrieval_on_a_coco_layout(tmp_path, capsys):
  from test_eval_retrieval import write_coco
  root = write_coco(tmp_path / 'coco')
  out = tmp_path / 'eval'
  assert cli.main(['eval', '--task', f'retrieval:coco={root}', '--out', str(out),
                   '--batch-size', '8']) == 0
  import json
  metrics = json.loads((out / 'results.json').read_text())['retrieval']['coco']
  assert 0 <= metrics['i2t_R@1'] <= 100 and metrics['num_images'] > 0
  assert list(out.glob('retrieval_coco*.png'))


@pytest.mark.parametrize('argv,expected', [
    ([], 'examples:'),
    (['train'], 'merged30m_vitb16.py'),
    (['eval'], 'retrieval:coco=/data/coco'),
    (['demo'], '--compare'),
    (['bench'], '--meshes'),
    (['convert'], '--layout'),
    (['data', 'convert'], 'a .csv/.tsv/.jsonl file'),
    (['similarity'], '--weights'),
])
def test_help_of_every_command(argv, expected, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv + ['--help'])
  assert exit_info.value.code == 0
  assert expected in capsys.readouterr().out
