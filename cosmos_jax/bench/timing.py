"""Throughput of the train step, the data pipeline and evaluation encoding.

Timed after a warm-up call (compilation excluded, reported apart), as medians over repeats.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from cosmos_jax import models
from cosmos_jax.bench.build import concrete_inputs
from cosmos_jax.bench.memory import add_stats
from cosmos_jax.data import pipeline
from cosmos_jax.eval.encode import Encoder
from cosmos_jax.train import partition
from cosmos_jax.train.from_config import (build_train_step, model_config, open_train_source,
                                          pipeline_config)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_train_step(config: ml_collections.ConfigDict, repeats: int) -> dict[str, Any]:
  """Seconds per step on the config's mesh, compile time, XLA's own FLOP count.

  'memory_row' is the memory table's row of the timed executable (see ``memory``).
  """
  mesh = partition.make_mesh(config.mesh.shape)
  partition.check_batch_size(config.batch_size, mesh)
  build = build_train_step(config, mesh)
  state, batch = concrete_inputs(build, config.batch_size)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = build.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {'state': build.after_first_step(state)}   # as the training loop has it
    del state   # so that the arrays it replaced are freed before the timing

    def one():
      holder['state'], metrics = compiled(holder['state'], batch)   # the state is donated
      return metrics

    seconds = median_seconds(one, repeats)
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):   # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  if ' while(' in compiled.as_text():
    cost = {}   # XLA's cost analysis counts a loop body once: scanned blocks would be undercounted
  shape = tuple(mesh.devices.shape)
  memory = add_stats({'mesh': list(shape), 'devices': mesh.size, 'backend': jax.default_backend(),
                      'global_batch': config.batch_size}, compiled.memory_analysis())
  return {'train_step_s': seconds, 'train_samples_per_s': config.batch_size / seconds,
          'compile_s': compile_s, 'xla_flops': float(cost.get('flops', 0.0)) or None,
          'memory_row': memory}


def bench_data(config: ml_collections.ConfigDict, batches: int) -> dict[str, float]:
  """Batches from the configured source through the whole pipeline (decode, crops, text)."""
  source = open_train_source(config)
  it = pipeline.make_train_iterator(source, pipeline_config(config), shard_index=0,
                                    shard_count=1)
  try:
    next(it)   # warm-up: workers start, first shards open
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    it.close()
  return {'data_samples_per_s': batches * config.batch_size / seconds}


def bench_eval(config: ml_collections.ConfigDict, repeats: int,
               batch_size: int = 64) -> dict[str, float]:
  """Image encoding at the model's resolution, as zero-shot evaluation runs it."""
  mcfg = model_config(config)
  params = models.init_params(mcfg, jax.random.key(0))
  mesh = partition.make_mesh((-1, 1, 1)) if jax.device_count() > 1 else None
  encoder = Encoder(mcfg, params, batch_size=batch_size, mesh=mesh, progress=False)
  size = mcfg.vision.image_size
  images = np.random.default_rng(0).standard_normal((batch_size, size, size, 3), np.float32)
  seconds = median_seconds(lambda: encoder.images(images), repeats)
  return {'eval_images_per_s': batch_size / seconds}
