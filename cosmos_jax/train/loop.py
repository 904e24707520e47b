"""The training loop: data -> jitted step -> metrics -> evaluation -> checkpoint.

Writes into ``workdir``: ``config.json`` (the resolved config), ``metrics.jsonl`` and
TensorBoard events (``tensorboard/``), ``checkpoints/``, ``eval/step_<N>/<tree>/`` (results
and PNGs) and ``plots/curves.png``. Resumes automatically from the newest good checkpoint in
``workdir`` (state and data-iterator position, so the next batch is the one an uninterrupted
run would see; a damaged newer one is set aside, ``checkpoint.py``) and drops the log rows a
killed run wrote past it; SIGTERM or a first Ctrl-C saves at the current step and returns; a
non-finite loss stops the run naming the step and the loss terms, before any checkpoint of
that step is written. Operational failures raise ``errors.UsageError`` / ``RunError`` with
one line saying what to do (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections

from cosmos_jax import config as config_lib
from cosmos_jax.errors import RunError, UsageError
from cosmos_jax.data import pipeline
from cosmos_jax.train import checkpoint, distributed, partition, reporting
from cosmos_jax.train.evaluation import InLoopEval
from cosmos_jax.train.from_config import (build_train_step, model_config, open_train_source,
                                          pipeline_config)


HEADLINE_METRICS = ('R@1', 'top1', 'mIoU')   # printed after each evaluation


class NonFiniteLossError(RunError, FloatingPointError):
  """The loss of a step is not finite; the last good checkpoint is kept (exit code 1)."""


def check_finite(step: int, metrics: dict) -> dict:
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not math.isfinite(values['total_loss']):
    terms = ', '.join(f'{k}={v:.6g}' for k, v in sorted(values.items()) if 'loss' in k
                      or k.startswith('distill_') or k.endswith('_scale'))
    raise NonFiniteLossError(f'non-finite loss at step {step}: {terms}; the last good '
                             'checkpoint is kept, nothing of this step was saved')
  return values


def check_batch_size_unchanged(config: ml_collections.ConfigDict, saved: dict | None) -> None:
  """A resume at another global batch size: a warning if allowed, else a UsageError."""
  if not saved or saved.get('batch_size', config.batch_size) == config.batch_size:
    return
  what = (f'the checkpoint was saved at batch_size {saved["batch_size"]}, this run has '
          f'batch_size {config.batch_size}: the data position, the learning-rate schedule and '
          'the EMA momentum were set for the saved one')
  if not config.checkpoint.allow_batch_size_change:
    raise UsageError(f'{what}; set --config.checkpoint.allow_batch_size_change=True to resume '
                     'anyway, or --config.batch_size=' + str(saved['batch_size']))
  logging.warning('%s; resuming anyway (checkpoint.allow_batch_size_change=True)', what)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to ``config.total_steps``; returns the last metrics, the evaluations and how it ended."""
  config_lib.validate(config)
  if '://' in workdir:
    raise UsageError(f'workdir {workdir!r}: give a local or mounted path (mount a bucket with '
                     'gcsfuse); metrics, events and plots are written with plain file IO')
  distributed.initialize()
  checkpoint.check_workdir_writable(workdir)   # before any compile
  mcfg = model_config(config)
  mesh = partition.make_mesh(config.mesh.shape)
  partition.check_batch_size(config.batch_size, mesh)
  evaluator = InLoopEval(config, mcfg, workdir, mesh)   # a missing dataset fails here
  build = build_train_step(config, mesh)
  source = open_train_source(config)
  data = pipeline.make_train_iterator(source, pipeline_config(config),
                                      shard_index=jax.process_index(),
                                      shard_count=jax.process_count())
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 save_every_steps=config.checkpoint.every_steps,
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save,
                                 fallback=config.checkpoint.fallback)
  check_batch_size_unchanged(config, ckpt.read_config())
  restored = ckpt.restore_or_none(build.abstract_state(), config=config.to_dict())
  if restored is not None:
    state, data_state, _ = restored
    if data_state is not None:
      data.set_state(data_state)
  else:
    state = build.init_state(config.seed)

  train_step, batch_sh = build.train_step, build.batch_sharding
  log = reporting.RunLog(workdir, start_step=int(state['step']))
  if restored is not None:
    resumed_step = int(state['step'])
    resumed = f'resumed from step {resumed_step} ({ckpt.directory / str(resumed_step)})'
    if log.dropped_rows:
      resumed += f'; dropped {log.dropped_rows} rows of metrics.jsonl written after it'
    logging.info(resumed)
    if log.enabled:
      print(resumed, flush=True)
  log.write_config(config.to_dict())
  curves_png = os.path.join(workdir, 'plots', 'curves.png')
  preempt = checkpoint.install_stop_handlers()   # SIGTERM, and a first Ctrl-C
  step = int(state['step'])
  last: dict[str, Any] = {}
  evaluations: dict[int, dict[str, float]] = {}
  status = 'completed'
  bar = reporting.progress_bar(config.total_steps, step, enabled=log.enabled)
  start, start_step = time.perf_counter(), step
  try:
    with jax.set_mesh(mesh):
      while step < config.total_steps:
        batch = distributed.host_local_batch_to_global(next(data), batch_sh)
        state, metrics = train_step(state, batch)
        if step == start_step:   # compiled and run once: the backend may re-home the state
          state = build.after_first_step(state)
        step += 1
        # Checked every step (one host sync) so no checkpoint ever holds a non-finite state.
        last = check_finite(step, metrics)
        bar.update(1)
        if step % config.log_every_steps == 0 or step == config.total_steps:
          last['steps_per_sec'] = (step - start_step) / (time.perf_counter() - start)
          last.update(reporting.data_counters(data.stats()))
          log.write(step, last)
          bar.set_postfix(loss=f'{last["total_loss"]:.4f}', refresh=False)
          logging.debug('step %d: %s', step, json.dumps(last))
        if evaluator.due(step, config.total_steps):
          evaluations[step] = evaluator(step, state)
          log.write(step, evaluations[step])
          bar.write(f'step {step}: ' + ', '.join(
              '{1} {2}/{3} {4}'.format(*k.split('/')) + f' {v:.2f}'
              for k, v in evaluations[step].items() if k.endswith(HEADLINE_METRICS)))
        stop = checkpoint.should_stop(preempt, step, ckpt)
        ckpt.save(step, state, data_state=data.get_state(), config=config.to_dict(),
                  force=stop or step == config.total_steps)
        ckpt.check()   # a failed background save stops the run now, not at the next save
        if stop:
          status = preempt.reason   # 'preempted' (SIGTERM) or 'interrupted' (Ctrl-C)
          break
  finally:
    bar.close()
    try:
      ckpt.close()   # waits for the last save; RunError if it failed
    finally:
      data.close()
      preempt.uninstall()
      log.close()
      if log.enabled:
        reporting.plot_curves(log.jsonl_path, curves_png, title=f'{mcfg.name}, '
                              f'{"COSMOS" if mcfg.cosmos else "CLIP"}, batch {config.batch_size}')
  return {'step': step, 'status': status, 'metrics': last, 'evaluations': evaluations,
          'plots': curves_png if log.enabled else None}
