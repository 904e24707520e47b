"""Throughput of the pieces of a run: the train step, the data pipeline and evaluation encoding.

Timed after a warm-up call (compilation excluded), as medians over repeats; printed as a
table and written as JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cosmos_jax import config as config_lib
from cosmos_jax import models
from cosmos_jax.data import pipeline
from cosmos_jax.eval.encode import Encoder
from cosmos_jax.train import distributed, optim, partition
from cosmos_jax.train.from_config import model_config, open_train_source, pipeline_config
from cosmos_jax.train import state as state_lib
from cosmos_jax.train import step as step_lib


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(fn())   # warm-up (compiles)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_train_step(config: ml_collections.ConfigDict, repeats: int) -> dict[str, float]:
  mcfg = model_config(config)
  mesh = partition.make_mesh(config.mesh.shape)
  tx, schedule = optim.optimizer_from_config(config.optim, config.total_steps)
  state, shardings = state_lib.create_state(mcfg, tx, mesh, config_lib.logical_rules(config),
                                            jax.random.key(0), with_teacher=mcfg.cosmos)
  d, b = config.data, config.batch_size
  rng = np.random.default_rng(0)
  batch = {'global': rng.integers(0, 256, (b, 2, d.global_size, d.global_size, 3), np.uint8),
           'local': rng.integers(0, 256, (b, d.num_local, d.local_size, d.local_size, 3), np.uint8),
           'text': rng.integers(1, 49406, (b, 8, mcfg.text.context_length)).astype(np.int32)}
  batch['text'][..., -1] = 49407
  batch = jax.device_put(batch, partition.batch_sharding(mesh))
  dtype = jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32
  step_cfg = step_lib.StepConfig(distill=mcfg.cosmos, total_steps=config.total_steps)
  train_step = jax.jit(step_lib.make_train_step(models.CLIP(mcfg, dtype=dtype,
                                                            remat=config.model.remat),
                                                tx, schedule, step_cfg))
  holder = {'state': state}

  def one():
    holder['state'], metrics = train_step(holder['state'], batch)
    return metrics

  with jax.set_mesh(mesh):
    seconds = _median_seconds(one, repeats)
  return {'train_step_s': seconds, 'train_samples_per_s': b / seconds}


def bench_data(config: ml_collections.ConfigDict, batches: int) -> dict[str, float]:
  source = open_train_source(config)
  it = pipeline.make_train_iterator(source, pipeline_config(config), shard_index=0,
                                    shard_count=1)
  try:
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    it.close()
  return {'data_samples_per_s': batches * config.batch_size / seconds}


def bench_eval(config: ml_collections.ConfigDict, repeats: int,
               batch_size: int = 64) -> dict[str, float]:
  mcfg = model_config(config)
  params = models.init_params(mcfg, jax.random.key(0))
  mesh = partition.make_mesh((-1, 1, 1)) if jax.device_count() > 1 else None
  encoder = Encoder(mcfg, params, batch_size=batch_size, mesh=mesh, progress=False)
  size = mcfg.vision.image_size
  images = np.random.default_rng(0).standard_normal((batch_size, size, size, 3), np.float32)
  seconds = _median_seconds(lambda: encoder.images(images), repeats)
  return {'eval_images_per_s': batch_size / seconds}


def run(config: ml_collections.ConfigDict, out_path: str | None = None, *, repeats: int = 5,
        data_batches: int = 10) -> dict[str, Any]:
  config_lib.validate(config)
  distributed.initialize()
  results: dict[str, Any] = {
      'config': {'variant': config.model.variant, 'batch_size': config.batch_size,
                 'mesh': list(config.mesh.shape), 'dtype': config.model.dtype},
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'date': time.strftime('%Y-%m-%d'),
  }
  results.update(bench_train_step(config, repeats))
  results.update(bench_data(config, data_batches))
  results.update(bench_eval(config, repeats))
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, 'w') as f:
      json.dump(results, f, indent=2)
  return results


def format_table(results: dict[str, Any]) -> str:
  rows = [('train step (s)', f'{results["train_step_s"]:.3f}'),
          ('train samples/s', f'{results["train_samples_per_s"]:.1f}'),
          ('data pipeline samples/s', f'{results["data_samples_per_s"]:.1f}'),
          ('eval images/s', f'{results["eval_images_per_s"]:.1f}')]
  head = f'{results["config"]["variant"]}, batch {results["config"]["batch_size"]}, ' \
         f'{results["devices"]}, {results["config"]["dtype"]}'
  width = max(len(r[0]) for r in rows)
  return '\n'.join([head] + [f'  {name:<{width}}  {value:>10}' for name, value in rows])
