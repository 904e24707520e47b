"""The official COSMOS (PyTorch) train step, timed on this machine beside ours.

``time_official_step(repo, config)`` runs the official code from a checkout of
ExplainableML/cosmos (a fork of open_clip): their ``open_clip`` and ``training`` packages
are imported from ``<repo>/src`` in a subprocess, so they never meet the installed
open_clip, and torch uses every core. Nothing of theirs is copied here.

What runs is their own code wherever it is a function:
  * the model: ``open_clip.create_model_and_transforms`` with the flags of their CC3M
    recipe (``--output-all --attentional-pool --cosmos``), on our variant's architecture
    (``ModelConfig.to_open_clip_json()`` registered with their ``add_model_config``);
  * the loss: their ``create_loss(args)`` (COSMOSLoss for a COSMOS run);
  * the step: their ``training.train.train_one_epoch`` over a small in-memory loader,
    float32 (``--precision fp32``), fixed EMA momentum (``--fix-momentum``).
The glue that lives inline in their ``main()`` is re-created following it line by line: the
seed, ``teacher = deepcopy(student)`` without gradients, AdamW over the two parameter groups
(no decay for ndim < 2 and names with bn/ln/bias/logit_scale) and ``cosine_lr``.

A step is the time between two consecutive batches drawn by their loop: the scheduler
call, student forward on the 2 global + ``num_local`` local crops and 8 captions, teacher
forward, COSMOSLoss, backward, EMA, ``optimizer.step()`` and the logit-scale clamps. The
first step (warm-up) and the last (it logs) are left out; the median of the rest is
reported. The loader yields the views already stacked per view (their COCO-style branch
of ``train_one_epoch``), so no per-sample ``torch.stack`` is counted against them.
Inputs match ``bench.bench_train_step``: uniform uint8 pixels (CLIP-normalised outside the
timed loop) and token ids in [1, 49406) ending in EOT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

# CLIP's normalisation constants (the values of open_clip's OPENAI_DATASET_MEAN/STD).
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def time_official_step(repo: str, config: Any, repeats: int = 5, device: str = 'cpu',
                       precision: str = 'fp32') -> dict[str, Any]:
  """Median seconds of the official train step at ``config``'s variant, batch and crops.

  Args:
    repo: a checkout of github.com/ExplainableML/cosmos (the folder holding ``src/``).
    config: a run config (``cosmos_jax.config.base_config()`` layout).
    repeats: timed steps (after one warm-up step).
    device: torch device of their model and batch ('cpu' or 'cuda').
    precision: their ``--precision`` ('fp32'; 'amp_bf16' beside our bfloat16 on a GPU).

  Returns:
    {'official_step_s', 'official_samples_per_s', 'official_commit',
     'official_threads', 'official_matmul_flops_per_s'} (the last: torch's float32
    2048 x 2048 ``torch.mm`` rate in the same process, the matmul peak it runs against).
  """
  # Imported here, so that the worker below never imports JAX.
  from cosmos_jax import models
  from cosmos_jax.xla_cpu import host as xla_cpu_host

  src = os.path.join(os.path.abspath(repo), 'src')
  if not os.path.isdir(os.path.join(src, 'open_clip')) or \
      not os.path.isdir(os.path.join(src, 'training')):
    raise FileNotFoundError(f'{repo} is not a checkout of ExplainableML/cosmos (no src/open_clip)')
  d = config.data
  spec = {
      'src': src,
      'model_cfg': models.get_variant(config.model.variant, cosmos=True).to_open_clip_json(),
      'batch_size': int(config.batch_size), 'global_size': int(d.global_size),
      'local_size': int(d.local_size), 'num_local': int(d.num_local), 'num_captions': 8,
      'lr': float(config.optim.lr), 'b1': float(config.optim.b1), 'b2': float(config.optim.b2),
      'eps': float(config.optim.eps), 'wd': float(config.optim.weight_decay),
      'warmup': int(config.optim.warmup_steps), 'total_steps': int(config.total_steps),
      'momentum': float(config.ema.momentum), 'seed': int(config.seed),
      'repeats': int(repeats), 'threads': os.cpu_count() or 1,
      'device': device, 'precision': precision,
  }
  # The caller's environment, without the malloc tunables cosmos-jax set for itself: the
  # official step runs as its own users run it.
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(spec),
                        capture_output=True, text=True, cwd=os.path.dirname(src),
                        env=xla_cpu_host.caller_environment())
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    raise RuntimeError(f'the official step failed (exit {proc.returncode}):\n'
                       f'{proc.stderr[-4000:]}')
  result = json.loads(lines[-1])
  result['official_commit'] = _commit(repo)
  return result


def _commit(repo: str) -> str | None:
  try:
    out = subprocess.run(['git', '-C', repo, 'rev-parse', 'HEAD'], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


# ---------------------------------------------------------------------------------------------
# The worker: runs in its own interpreter with <repo>/src first on sys.path.


class _Loader:
  """The ``data['train']`` object their loop reads: set_epoch, dataloader, num_batches."""

  def __init__(self, batch, steps: int, batch_size: int, sync=lambda: None):
    self.batch, self.num_batches, self.num_samples = batch, steps, steps * batch_size
    self.stamps: list[float] = []
    self.sync = sync   # on a GPU: wait for the queued step before taking the time

  @property
  def dataloader(self):
    return self

  def set_epoch(self, epoch):
    del epoch

  def __iter__(self):
    import time
    for _ in range(self.num_batches):
      self.sync()
      self.stamps.append(time.perf_counter())
      yield self.batch
    self.sync()
    self.stamps.append(time.perf_counter())


def _worker(spec: dict) -> dict:
  import argparse
  import copy
  import random
  import statistics
  import tempfile
  import time

  import numpy as np
  import torch

  torch.set_num_threads(spec['threads'])
  sys.path[0:1] = [spec['src']]    # their open_clip and training, not this folder or site's
  import open_clip
  from training.scheduler import cosine_lr
  from training.train import train_one_epoch
  if not os.path.abspath(open_clip.__file__).startswith(spec['src']):
    raise RuntimeError(f'imported {open_clip.__file__}, not the official open_clip')

  b, n_local, n_cap = spec['batch_size'], spec['num_local'], spec['num_captions']
  args = argparse.Namespace(
      model='cosmos-bench', device=spec['device'], precision=spec['precision'], distill=False,
      siglip=False,
      cosmos=True, accum_freq=1, skip_scheduler=False, use_imagecrop_aug=True,
      global_crops_number=2, local_crops_number=n_local, num_sampled_captions=n_cap,
      fix_momentum=True, momentum_teacher=spec['momentum'], grad_clip_norm=None,
      horovod=False, local_loss=False, gather_with_grad=False, rank=0, local_rank=0,
      world_size=1, batch_size=b, log_every_n_steps=10 ** 9, wandb=False, seed=spec['seed'],
      lr=spec['lr'], beta1=spec['b1'], beta2=spec['b2'], eps=spec['eps'], wd=spec['wd'],
      warmup=spec['warmup'])

  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, f'{args.model}.json'), 'w') as f:
      json.dump(spec['model_cfg'], f)
    open_clip.add_model_config(tmp)
    # main(): random_seed(args.seed, 0), then the model as their CC3M recipe builds it.
    torch.manual_seed(args.seed), np.random.seed(args.seed), random.seed(args.seed)
    student, _, _ = open_clip.create_model_and_transforms(
        args.model, None, precision=args.precision, device=args.device, output_dict=True,
        use_imagecrop_aug=True, global_crops_number=2, local_crops_number=n_local,
        output_all=True, attentional_pool=True, cosmos=True)
  teacher = copy.deepcopy(student)
  for p in teacher.parameters():
    p.requires_grad = False

  # main(): the two AdamW parameter groups.
  def exclude(n, p):
    return p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n
  named = list(student.named_parameters())
  optimizer = torch.optim.AdamW(
      [{'params': [p for n, p in named if exclude(n, p) and p.requires_grad], 'weight_decay': 0.},
       {'params': [p for n, p in named if not exclude(n, p) and p.requires_grad],
        'weight_decay': args.wd}],
      lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
  scheduler = cosine_lr(optimizer, args.lr, args.warmup, spec['total_steps'])
  loss = open_clip.create_loss(args)

  rng = np.random.default_rng(0)
  mean = np.asarray(_MEAN, np.float32)[:, None, None]
  std = np.asarray(_STD, np.float32)[:, None, None]

  def views(n, size):   # n tensors (B, 3, size, size), CLIP-normalised
    pixels = rng.integers(0, 256, (n, b, 3, size, size), np.uint8)
    return [torch.from_numpy((v / np.float32(255) - mean) / std) for v in pixels]

  images = views(2, spec['global_size']) + views(n_local, spec['local_size'])
  text = rng.integers(1, 49406, (b, n_cap, spec['model_cfg']['text_cfg']['context_length']))
  text[..., -1] = 49407
  cuda = args.device.startswith('cuda')
  loader = _Loader((images, torch.from_numpy(text)), spec['repeats'] + 2, b,
                   sync=torch.cuda.synchronize if cuda else (lambda: None))

  train_one_epoch(student, teacher, {'train': loader}, loss, 0, optimizer, None, scheduler,
                  None, None, args)
  steps = np.diff(loader.stamps)[1:-1]
  step_s = float(statistics.median(steps))

  # torch's matmul rate: float32 2048 on a CPU; bfloat16 8192 on a GPU, where their step's
  # autocast runs its products in bfloat16.
  n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
  x = torch.randn(n, n, device=args.device, dtype=dtype)
  y = torch.randn(n, n, device=args.device, dtype=dtype)
  torch.mm(x, y)
  mm = []
  for _ in range(10):
    loader.sync()
    start = time.perf_counter()
    torch.mm(x, y)
    loader.sync()
    mm.append(time.perf_counter() - start)
  return {'official_step_s': step_s, 'official_samples_per_s': b / step_s,
          'official_threads': torch.get_num_threads(), 'official_device': args.device,
          'official_precision': args.precision,
          'official_matmul_flops_per_s': 2 * n ** 3 / statistics.median(mm)}


if __name__ == '__main__':
  print(json.dumps(_worker(json.loads(sys.stdin.read()))))
