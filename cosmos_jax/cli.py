"""The ``cosmos-jax`` command line: train, eval, data, convert, bench, demo, similarity, variants."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from cosmos_jax import cli_output

from cosmos_jax.xla_cpu import host as xla_cpu_host


def _cmd_demo(args: argparse.Namespace) -> int:
  from cosmos_jax import demo
  print(demo.run_demo(args.workdir, compare=args.compare, steps=args.steps,
                      overrides=args.overrides))
  return 0


def _cmd_similarity(args: argparse.Namespace) -> int:
  from cosmos_jax import models, similarity
  params = None
  if args.weights:
    from cosmos_jax.train.weights import load_for_eval
    config, params = load_for_eval(args.weights, which=args.which, variant=args.variant)
  else:
    config = models.get_variant(args.variant or 'tiny')
  result = similarity.run(config, params=params, n=args.num)
  print(f'model: {config.name} ({"COSMOS" if config.cosmos else "CLIP"}), '
        f'{"weights " + args.weights if args.weights else "random init"}')
  print(similarity.format_result(result))
  return 0


def _cmd_convert(args: argparse.Namespace) -> int:
  from cosmos_jax import convert
  print(convert.convert(args.src, args.dst, variant=args.variant, which=args.which,
                        layout=args.layout, overwrite=args.overwrite))
  return 0


def _cmd_train(args: argparse.Namespace) -> int:
  from cosmos_jax import config_cli
  from cosmos_jax.train import loop
  if '://' not in args.workdir:   # a URL is refused by the loop; create nothing locally for it
    args.session.log_to(os.path.join(args.workdir, 'train.log'))
  logging.info('cosmos-jax %s', ' '.join(args.argv), extra={'file_only': True})
  config = config_cli.load_config_file(args.config)
  config_cli.apply_overrides(config, args.overrides)
  result = loop.train(config, args.workdir)
  print(f'{result["status"]} at step {result["step"]}: '
        + ', '.join(f'{k}={v:.4g}' for k, v in sorted(result['metrics'].items())))
  return 0


def _cmd_eval(args: argparse.Namespace) -> int:
  from cosmos_jax.eval import report, run
  from cosmos_jax.data.synthetic import config_from_fields
  from cosmos_jax.train.weights import load_for_eval
  import jax
  from cosmos_jax import models
  from cosmos_jax.train import partition
  specs = [run.parse_task(t) for t in (args.task or ['synthetic'])]
  variant, synthetic_fields = args.variant, {'image_size': 64}
  if args.config:   # the run's config gives the architecture and the synthetic generator
    from cosmos_jax import config_cli
    run_config = config_cli.load_config_file(args.config)
    config_cli.apply_overrides(run_config, args.overrides)
    variant = variant or run_config.model.variant
    synthetic_fields = run_config.data.synthetic.to_dict()
  if args.synthetic_size:
    synthetic_fields['image_size'] = args.synthetic_size
  if args.checkpoint:
    config, params = load_for_eval(args.checkpoint, which=args.which, variant=variant)
  else:
    config = models.get_variant(variant or 'tiny')
    params = models.init_params(config, jax.random.key(0))
  synthetic = config_from_fields({**synthetic_fields, 'num_val': args.synthetic_num})
  mesh = partition.make_mesh((-1, 1, 1)) if jax.device_count() > 1 else None
  results = run.run(config, params, specs, args.out, batch_size=args.batch_size,
                    synthetic_config=synthetic, mesh=mesh)
  print(report.markdown_table(results))
  print(f'results written to {args.out}/results.json and results.md')
  return 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
  from cosmos_jax.data.sources import open_source
  from cosmos_jax.data.sources.arrayrecord import convert_to_array_record
  source = open_source(args.src)
  print(convert_to_array_record(source, args.dst, split=args.split, overwrite=args.overwrite))
  return 0


def _cmd_data_synthetic(args: argparse.Namespace) -> int:
  from cosmos_jax.data import synthetic
  cfg = synthetic.SyntheticConfig(image_size=args.image_size, num_train=args.num,
                                  num_val=args.num, seed=args.seed)
  dataset = synthetic.SyntheticDataset(cfg, split=args.split)
  paths = synthetic.write_tar_shards(dataset, args.out_dir,
                                     samples_per_shard=args.samples_per_shard)
  print(f'wrote {len(dataset)} samples in {len(paths)} shards: '
        f'{synthetic.shard_pattern(args.out_dir, len(paths), f"synthetic-{args.split}")}')
  return 0


def _cmd_bench(args: argparse.Namespace) -> int:
  from cosmos_jax import bench, config_cli
  from cosmos_jax.bench.memory import parse_mesh
  config = config_cli.load_config_file(args.config)
  config_cli.apply_overrides(config, args.overrides)
  if args.tpu_topology:   # compile for a TPU slice instead of timing on this machine
    from cosmos_jax.bench import aot, aot_table
    results = aot.run(config, args.tpu_topology, search=args.search, out_path=args.out,
                      hlo_path=args.hlo)
    print(aot_table.format_report(results))
    if args.out:
      print(f'written to {args.out}')
    return 0
  if args.data_pod:   # the input pipeline at the recipe's real sizes, instead of the step
    from cosmos_jax.bench import data_pod
    results = data_pod.run(config, workers=args.data_pod, batches=args.data_batches,
                           official_repo=args.official_repo,
                           aot_json=args.aot_json, out_path=args.out)
    print(data_pod.format_report(results))
    if args.out:
      print(f'written to {args.out}')
    return 0
  if args.search or args.hlo:
    from cosmos_jax.errors import UsageError
    raise UsageError('--search and --hlo go with --tpu-topology')
  skip = [s.strip() for s in (args.skip or '').split(',') if s.strip()]
  meshes = [parse_mesh(m) for m in args.meshes] if args.meshes else None
  results = bench.run(config, args.out, repeats=args.repeats, data_batches=args.data_batches,
                      meshes=meshes, skip=skip, per_device_batch=args.per_device_batch,
                      official_repo=args.official_repo)
  print(bench.format_table(results))
  if args.out:
    print(f'written to {args.out}')
  return 0


def _cmd_variants(args: argparse.Namespace) -> int:
  import jax
  from cosmos_jax import models
  print(f'{"name":<10} {"embed":>5} {"image":>5} {"patch":>5} {"v.width":>7} {"v.layers":>8} '
        f'{"t.width":>7} {"t.layers":>8} {"params (COSMOS)":>16}')
  for name, cfg in models.VARIANTS.items():
    shapes = jax.eval_shape(lambda c=cfg: models.init_params(c, jax.random.key(0)))
    count = sum(x.size for x in jax.tree.leaves(shapes))
    v, t = cfg.vision, cfg.text
    print(f'{name:<10} {cfg.embed_dim:>5} {v.image_size:>5} {v.patch_size:>5} {v.width:>7} '
          f'{v.layers:>8} {t.width:>7} {t.layers:>8} {count:>16,}')
  return 0


EXAMPLES = '''examples:
  cosmos-jax demo                                    # tiny COSMOS on synthetic data, ~10 min on CPU
  cosmos-jax train --config configs/cc3m_vitb16.py --workdir runs/cc3m \\
      --config.data.train='/data/cc3m/cc3m-train-{0000..0575}.tar'
  cosmos-jax eval --checkpoint runs/cc3m --task retrieval:coco=/data/coco
  cosmos-jax convert cosmos_vitb16_merged30m.pt ckpt/vitb16_merged30m
  cosmos-jax bench --config configs/demo.py --out runs/bench.json

Run `cosmos-jax COMMAND --help` for a command's options. A failure prints one line and exits
2 (fix the command or config) or 1 (the run failed); --debug (anywhere) adds the traceback, and
`train` writes every log line and any traceback to WORKDIR/train.log.'''

TRAIN_EPILOG = '''config files (configs/, each with a :clip CLIP-only baseline):
  demo.py                the tiny model on the embedded synthetic dataset (CPU)
  cc3m_vitb16.py         cc12m_vitb16.py      yfcc15m_vitb16.py
  merged30m_vitb16.py    pixelprose_vitb16.py merged30m_vitb32.py   (the paper's recipes)

config sections (README "Configuration reference"; config.json in a workdir lists them all):
  seed, total_steps, batch_size, model.*, data.*, optim.*, ema.*, mesh.*, checkpoint.*, eval.*,
  log_every_steps

examples:
  cosmos-jax train --config configs/demo.py --workdir runs/demo
  cosmos-jax train --config configs/demo.py:clip --workdir runs/demo_clip --config.total_steps=300
  cosmos-jax train --config configs/merged30m_vitb16.py --workdir runs/m30 \\
      --config.mesh.shape='(-1,8,1)' --config.model.dtype=bfloat16'''


class _Parser(argparse.ArgumentParser):
  """Usage errors in one line, as every other failure (argparse prints the usage first)."""

  def error(self, message: str):
    self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog='cosmos-jax', description='COSMOS vision-language pre-training in JAX/Flax.',
      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--debug', action='store_true',
                      help='on a failure, print the traceback too (also accepted after COMMAND)')
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  p = sub.add_parser('train', help='train COSMOS (or the CLIP baseline) from a config',
                     description='Trains to config.total_steps, evaluating eval.tasks every '
                                 'eval.every_steps and at the end. Resumes automatically from the '
                                 'latest checkpoint in --workdir. Any config field can be '
                                 'overridden: --config.optim.lr=1e-3; an unknown field or a bad '
                                 'value fails at once, naming it.',
                     epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, help='configs/<file>.py[:arg]')
  p.add_argument('--workdir', required=True,
                 help='a local or mounted directory: config.json, metrics.jsonl, tensorboard/, '
                      'checkpoints/, eval/, plots/')
  p.set_defaults(func=_cmd_train, accepts_overrides=True)

  p = sub.add_parser(
      'eval', help='zero-shot retrieval, classification and segmentation',
      description='Tasks: TASK:DATASET=ROOT, e.g. retrieval:coco=/data/coco, '
                  'retrieval:flickr30k=/data/flickr30k, classification:imagenet=/data/imagenet/val, '
                  'classification:folder=/data/my_folder, segmentation:voc20=/data/VOC2012 '
                  '(voc20, voc21, context59, context60, ade20k, cityscapes, coco_stuff164k, '
                  'coco_object), or "synthetic" (all three on the synthetic val split; default).')
  p.add_argument('--config', help='configs/<file>.py[:arg] of the run (architecture, synthetic '
                 'resolution); --config.<field>=<value> overrides apply')
  p.add_argument('--checkpoint', help='a training workdir, a params dir, or a .pt/.bin/.safetensors '
                 'file (default: random init, for a smoke test)')
  p.add_argument('--which', default='teacher', choices=['teacher', 'student'],
                 help='tree to evaluate (default: teacher)')
  p.add_argument('--variant', help='architecture override (name or open_clip JSON)')
  p.add_argument('--task', action='append', help='repeatable; see above')
  p.add_argument('--out', default='eval_results', help='output folder (results.json/.md, PNGs)')
  p.add_argument('--batch-size', type=int, default=256)
  p.add_argument('--synthetic-size', type=int, help='synthetic image size (default: the '
                 "config's, else 64)")
  p.add_argument('--synthetic-num', type=int, default=400, help='synthetic val images')
  p.set_defaults(func=_cmd_eval, accepts_overrides=True)

  p = sub.add_parser('data', help='prepare data: ArrayRecord conversion, synthetic shards')
  data_sub = p.add_subparsers(dest='data_command', required=True, metavar='DATA_COMMAND')
  q = data_sub.add_parser('convert', help='tar shards or CSV/JSONL -> an ArrayRecord tfds dataset',
                          description='SRC is anything the training data field accepts: a tar '
                                      'pattern such as cc3m-train-{0000..0575}.tar (several '
                                      'joined with ::), a .csv/.tsv/.jsonl file, or synthetic:train.')
  q.add_argument('src')
  q.add_argument('dst', help='output directory of the tfds dataset')
  q.add_argument('--split', default='train')
  q.add_argument('--overwrite', action='store_true')
  q.set_defaults(func=_cmd_data_convert)
  q = data_sub.add_parser('synthetic', help='write the embedded synthetic dataset as tar shards')
  q.add_argument('out_dir')
  q.add_argument('--split', default='train', choices=['train', 'val'])
  q.add_argument('--num', type=int, default=1000, help='samples in the split')
  q.add_argument('--image-size', type=int, default=224)
  q.add_argument('--samples-per-shard', type=int, default=1000)
  q.add_argument('--seed', type=int, default=0)
  q.set_defaults(func=_cmd_data_synthetic)

  p = sub.add_parser(
      'demo', help='train the tiny COSMOS on synthetic data, evaluate, show (about 10 min on CPU)',
      description='Trains configs/demo.py (the tiny model, 600 steps on the embedded synthetic '
                  'dataset) into WORKDIR/cosmos, evaluates retrieval, shape classification and '
                  'zero-shot segmentation, and prints a table next to chance level with the '
                  'paths of the PNGs. --compare also trains the CLIP-only baseline into '
                  'WORKDIR/clip. Finished runs are reused; interrupted ones resume.')
  p.add_argument('--workdir', default='runs/demo', help='default: runs/demo')
  p.add_argument('--compare', action='store_true',
                 help='COSMOS and the CLIP-only baseline, seeds 0-2 each')
  p.add_argument('--steps', type=int, help='training steps (default: the config\'s 1,000)')
  p.set_defaults(func=_cmd_demo, accepts_overrides=True, log_level=logging.WARNING)

  p = sub.add_parser('similarity',
                     help='encode a few drawn scenes and captions with any weights, print similarities')
  p.add_argument('--variant', help='model variant name or open_clip JSON (default: tiny, or the '
                 'architecture of --weights)')
  p.add_argument('--weights', help='weights to load: a training workdir, a params dir or a '
                 '.pt/.bin/.safetensors file (default: random init)')
  p.add_argument('--which', default='teacher', choices=['student', 'teacher'],
                 help='which tree of a COSMOS checkpoint to use (default: teacher)')
  p.add_argument('--num', type=int, default=4, help='number of image-caption pairs')
  p.set_defaults(func=_cmd_similarity)

  p = sub.add_parser(
      'convert', help='convert weights between PyTorch (.pt/.bin/.safetensors) and cosmos_jax',
      description='The format of each side is told by its form: a .pt/.pth/.bin/.safetensors '
                  'file is PyTorch (official COSMOS or open_clip layout); a directory is a '
                  'cosmos_jax parameter checkpoint.')
  p.add_argument('src')
  p.add_argument('dst')
  p.add_argument('--variant', help='architecture (name or open_clip JSON); inferred from shapes if omitted')
  p.add_argument('--which', default='both', choices=['both', 'student', 'teacher'],
                 help='trees of a COSMOS checkpoint to convert (default: both)')
  p.add_argument('--layout', choices=['open_clip', 'cosmos'],
                 help='PyTorch layout to write (default: cosmos for COSMOS models, else open_clip)')
  p.add_argument('--overwrite', action='store_true',
                 help='replace an existing DST file or params directory (never SRC itself)')
  p.set_defaults(func=_cmd_convert)

  p = sub.add_parser(
      'bench', help='time the train step, count its FLOPs, measure peak, memory, data and eval',
      description='Train step seconds (compilation excluded; medians over --repeats calls), '
                  'model FLOPs per step (analytic), achieved FLOP/s and its fraction of the '
                  'matmul peak measured in the same run, per-device memory of the compiled '
                  'step for each --meshes shape (meshes larger than this machine compile on '
                  'forced CPU devices in a child process), data-pipeline samples/s and '
                  'evaluation images/s. Config overrides apply (--config.batch_size=2).')
  p.add_argument('--config', required=True, help='configs/<file>.py[:arg]')
  p.add_argument('--out', '--json', help='write the figures as JSON here')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--tpu-topology', metavar='NAME',
                 help='instead of timing here, compile the step for this TPU slice (v5e-256, '
                      'v4-128, v5p-128, v6e-64 or v5e:16x16; needs the aot extra) and report '
                      'its per-device memory against the HBM, collectives, XLA cost and an '
                      'estimated step time')
  p.add_argument('--search', action='store_true',
                 help='with --tpu-topology: if the step does not fit, try a larger fsdp axis, '
                      'remat and bfloat16 (and their combinations) and report the first fit')
  p.add_argument('--hlo', metavar='PATH',
                 help="with --tpu-topology: write the compiled step's HLO text here")
  p.add_argument('--meshes', nargs='+', metavar='D,F,M',
                 help="mesh shapes ('data','fsdp','model') of the memory table, e.g. 8,1,1 "
                      "2,2,2 16,4,1 (default: the config's mesh)")
  p.add_argument('--per-device-batch', type=int,
                 help='memory table: global batch = this x data x fsdp of each mesh '
                      "(default: the config's batch_size, which must divide each)")
  p.add_argument('--skip', metavar='SECTIONS',
                 help='comma-separated sections to leave out: train, peak, memory, data, eval')
  p.add_argument('--data-batches', type=int, default=10, help='batches timed from the pipeline')
  p.add_argument('--data-pod', type=int, nargs='?', const=2, metavar='WORKERS',
                 help="instead of the step, time the config's input pipeline from JPEG tar "
                      'shards at 256-512 px that it writes to a temporary directory, in one '
                      'core and with WORKERS grain workers (default 2), and decoding + '
                      "multi-crop alone against the official code's (measured with "
                      '--official-repo, else the figure recorded on a 2-core machine)')
  p.add_argument('--aot-json', metavar='FILE',
                 help='with --data-pod: a --tpu-topology JSON; adds the cores a 4-chip host '
                      'of that slice needs at its estimated step time')
  p.add_argument('--official-repo', metavar='PATH',
                 help='also time the official PyTorch step (with --data-pod: their '
                      'augmentation) from this ExplainableML/cosmos checkout and report the '
                      'speedup')
  p.set_defaults(func=_cmd_bench, accepts_overrides=True)

  p = sub.add_parser('variants', help='list the named model variants')
  p.set_defaults(func=_cmd_variants)
  return parser


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
  """``--debug`` is global: taken out wherever it stands before a bare ``--``."""
  end = argv.index('--') if '--' in argv else len(argv)
  kept = [a for a in argv[:end] if a != '--debug'] + argv[end:]
  return kept, len(kept) != len(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one command; a failure is one line on stderr and exit code 2 (usage) or 1 (run)."""
  argv, debug = _pop_debug(list(sys.argv[1:] if argv is None else argv))
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if extra and not getattr(args, 'accepts_overrides', False):
    parser.error(f'unrecognized arguments: {" ".join(extra)}')
  args.overrides, args.argv, args.debug = extra, argv, debug
  args.session = cli_output.Session(args.command, debug=debug,
                                    level=getattr(args, 'log_level', logging.INFO))
  try:
    return args.func(args)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except  (one line each)
    return args.session.fail(e)
  finally:
    args.session.close()


def run() -> None:
  """The ``cosmos-jax`` program: malloc settings for XLA:CPU where they apply (``xla_cpu``),
  then ``main``."""
  xla_cpu_host.reexec_with_malloc_tuning(sys.argv[1:])
  sys.exit(main())


if __name__ == '__main__':
  run()
