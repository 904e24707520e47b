"""The run configuration: every field with its default, and the check that runs before compiling.

Recipes in ``configs/*.py`` start from ``base_config()`` and change what differs; the command
line overrides any field (``--config.optim.lr=1e-3``). The resolved config is saved with every
checkpoint. Defaults are the official CC3M recipe (spec 4.1) on the ViT-B/16.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from cosmos_jax.sharding_rules import RULE_PRESETS, resolve_rules


ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'cpu_custom')
CPU_TUNING_MODES = ('auto', 'on', 'off')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 88_576             # 32 epochs of CC3M at global batch 1024
  c.batch_size = 1024                # global batch

  c.model = ml_collections.ConfigDict(dict(
      variant='ViT-B-16',            # a name of models.VARIANTS or an open_clip JSON
      cosmos=True,                   # False: the CLIP-only baseline (no teacher, no distillation)
      dtype='float32',               # matmul dtype: 'float32' or 'bfloat16'
      remat=False,                   # rematerialise every residual block
      # Attention kernel: 'auto' (cpu_custom on CPU, cudnn on GPU where its limits allow, else
      # xla), 'xla' (jax.nn.dot_product_attention, XLA's own), 'cudnn' (fused, GPU only) or
      # 'cpu_custom' (a hand-written backward tuned for XLA:CPU). All compute the same function.
      attention='auto',
      scan_layers=False,             # the residual blocks as one nn.scan (faster pod compiles)
  ))
  c.data = ml_collections.ConfigDict(dict(
      train='synthetic:train',       # tar pattern, ArrayRecord dir, .csv/.jsonl, or synthetic
      text_mode='textcrop',          # 'textcrop' (DreamLIP) or 'textcrop_pixelprose'
      global_size=224, local_size=96, num_local=6,
      global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
      max_global_sentences=5,
      worker_count=8, max_bad_fraction=0.01,
      # Used when `train` is 'synthetic:...': the embedded dataset's size and resolution.
      synthetic=ml_collections.ConfigDict(dict(image_size=224, num_train=100_000, num_val=1000)),
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.5, warmup_steps=2000,
      grad_clip_norm=0.0,            # 0: off, as the reference
  ))
  c.ema = ml_collections.ConfigDict(dict(
      momentum=0.999,                # 0.999 at global batch 1024, 0.99 at 4096
      schedule='fixed',              # 'fixed' (the released recipes) or 'cosine' (to `final`)
      final=1.0,
  ))
  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),              # ('data', 'fsdp', 'model'); -1 takes the remaining devices
      preset='fsdp',                 # 'dp', 'fsdp' or 'fsdp_tp' (train/partition.py)
      rules=(),                      # an explicit logical->mesh table; overrides the preset
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, keep=3, async_save=True,
      fallback=True,                 # a damaged newest checkpoint: set aside, resume the previous
      allow_batch_size_change=False,  # resume a run saved at another batch_size (else refused)
  ))
  c.eval = ml_collections.ConfigDict(dict(
      # TASK:DATASET=ROOT specs of `cosmos-jax eval` ('synthetic' = all three on the embedded
      # val split). Run every `every_steps` (0: only at the end) and after the last step.
      tasks=('retrieval:coco=/data/coco',),
      every_steps=2768,              # one CC3M epoch at batch 1024, as the reference's --val-data
      which='teacher',               # 'teacher', 'student' or 'both'
      batch_size=256,
  ))
  c.perf = ml_collections.ConfigDict(dict(
      # XLA:CPU tuning (cosmos_jax/xla_cpu/): 'auto' turns it on only for a single CPU device
      # with no accelerator on the host; 'on' forces it on a CPU mesh, 'off' never.
      cpu_tuning='auto',
  ))
  c.log_every_steps = 50
  return c


def logical_rules(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """The logical->mesh table of the config: ``mesh.rules`` if given, else the preset's."""
  return resolve_rules(config.mesh.rules or config.mesh.preset)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field whose value cannot work."""
  def need(ok: bool, field: str, what: str):
    if not ok:
      raise ValueError(f'config.{field} = {config_get(config, field)!r}: {what}')

  need(config.batch_size > 0, 'batch_size', 'must be positive')
  need(config.total_steps > 0, 'total_steps', 'must be positive')
  need(config.model.dtype in ('float32', 'bfloat16'), 'model.dtype',
       "must be 'float32' or 'bfloat16'")
  need(config.model.attention in ATTENTION_IMPLS, 'model.attention',
       f'must be one of {", ".join(ATTENTION_IMPLS)}')
  need(config.perf.cpu_tuning in CPU_TUNING_MODES, 'perf.cpu_tuning',
       f'must be one of {", ".join(CPU_TUNING_MODES)}')
  need(config.optim.lr > 0, 'optim.lr', 'must be positive')
  need(0 <= config.optim.b1 < 1 and 0 <= config.optim.b2 < 1, 'optim.b1',
       'betas must be in [0, 1)')
  need(0 <= config.optim.warmup_steps < config.total_steps, 'optim.warmup_steps',
       'must be in [0, total_steps)')
  need(0 < config.ema.momentum <= 1, 'ema.momentum', 'must be in (0, 1]')
  need(config.ema.schedule in ('fixed', 'cosine'), 'ema.schedule', "must be 'fixed' or 'cosine'")
  need(len(config.mesh.shape) == 3, 'mesh.shape', 'needs 3 entries (data, fsdp, model)')
  need(config.mesh.rules or config.mesh.preset in RULE_PRESETS, 'mesh.preset',
       f'must be one of {sorted(RULE_PRESETS)}')
  need(config.data.text_mode in ('textcrop', 'textcrop_pixelprose'), 'data.text_mode',
       "must be 'textcrop' or 'textcrop_pixelprose'")
  need(0 <= config.data.max_bad_fraction < 1, 'data.max_bad_fraction', 'must be in [0, 1)')
  need(config.checkpoint.every_steps > 0, 'checkpoint.every_steps', 'must be positive')
  need(config.checkpoint.keep is None or config.checkpoint.keep > 0, 'checkpoint.keep',
       'must be positive (or None: keep all)')
  for flag in ('async_save', 'fallback', 'allow_batch_size_change'):
    need(isinstance(config.checkpoint[flag], bool), f'checkpoint.{flag}', 'must be True or False')
  need(math.isfinite(config.optim.weight_decay), 'optim.weight_decay', 'must be finite')
  need(config.eval.every_steps >= 0, 'eval.every_steps', 'must be >= 0 (0: only at the end)')
  need(config.eval.which in ('teacher', 'student', 'both'), 'eval.which',
       "must be 'teacher', 'student' or 'both'")
  need(config.eval.which == 'student' or config.model.cosmos, 'eval.which',
       "a CLIP-only run (model.cosmos=False) has no teacher; use 'student'")
  need(config.eval.batch_size > 0, 'eval.batch_size', 'must be positive')


def config_get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def reference_steps_per_epoch(num_samples: int, batch_size: int, loader_workers: int = 16) -> int:
  """Steps in one epoch as the reference's loader counts them (open_clip ``get_wds_dataset``).

  N / batch is rounded up, then up again to a multiple of the data-loader workers per process
  (16 in every train script, spec 2.4), so that each worker yields the same number of batches.
  """
  batches = -(-num_samples // batch_size)
  return -(-batches // loader_workers) * loader_workers


def reference_recipe(arg: str, *, train: str, num_samples: int, batch_size: int, momentum: float,
                     variant: str = 'ViT-B-16', text_mode: str = 'textcrop',
                     epochs: int = 32) -> ml_collections.ConfigDict:
  """One of the paper's runs (spec 2.1, 4.1): ``base_config()`` plus what differs per dataset.

  ``arg`` is '' for COSMOS or 'clip' for the CLIP-only baseline with the same step budget.
  The run is ``epochs`` epochs of ``reference_steps_per_epoch`` steps, evaluated after each
  epoch as the reference's ``--val-data``.
  """
  if arg not in ('', 'clip'):
    raise ValueError(f"unknown recipe argument {arg!r}: use none (COSMOS) or 'clip'")
  c = base_config()
  c.model.variant = variant
  c.data.train = train
  c.data.text_mode = text_mode
  c.batch_size = batch_size
  c.ema.momentum = momentum
  epoch = reference_steps_per_epoch(num_samples, batch_size)
  c.total_steps = epochs * epoch
  c.eval.every_steps = epoch
  # Below every recipe's epoch (2448 to 6576 steps): a preempted run loses at most 2000 steps.
  c.checkpoint.every_steps = 2000
  # The state sharded over every device (the batch too): the mesh their TPU fit was compiled
  # with (docs/tpu_recipes.md). With (-1, 1, 1) each chip would hold the whole state.
  c.mesh.shape = (1, -1, 1)
  if arg == 'clip':
    c.model.cosmos = False
    c.eval.which = 'student'   # a CLIP-only run has no teacher
  return c
