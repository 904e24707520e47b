"""The objects a run is built from, read off its config (model, train step, data pipeline, source)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding

from cosmos_jax import config as config_lib
from cosmos_jax import models
from cosmos_jax.data import augment, captions, pipeline
from cosmos_jax.data.sources import open_source
from cosmos_jax.train import optim, partition
from cosmos_jax.train import state as state_lib
from cosmos_jax.train import step as step_lib


def model_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  return models.get_variant(config.model.variant, cosmos=config.model.cosmos)


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """The matmul dtype of ``model.dtype``; parameters stay float32 either way."""
  return jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32


@dataclasses.dataclass
class StepBuild:
  """The jitted train step and what it was built from: one definition for training and bench."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: models.ModelConfig
  tx: Any
  shardings: dict
  batch_sharding: NamedSharding
  train_step: Callable   # jitted, the state donated

  def abstract_state(self) -> dict:
    """ShapeDtypeStructs with the state's shardings (a restore target; allocates nothing)."""
    return state_lib.abstract_state(self.shardings, self.model, self.tx,
                                    with_teacher=self.model.cosmos)

  def init_state(self, seed: int) -> dict:
    init = jax.jit(lambda key: state_lib.init_state(self.model, self.tx, key,
                                                    with_teacher=self.model.cosmos),
                   out_shardings=self.shardings)
    return init(jax.random.key(seed))


def build_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> StepBuild:
  mcfg = model_config(config)
  tx, schedule = optim.optimizer_from_config(config.optim, config.total_steps)
  shardings = state_lib.state_shardings(mcfg, tx, mesh, config_lib.logical_rules(config),
                                        with_teacher=mcfg.cosmos)
  model = models.CLIP(mcfg, dtype=compute_dtype(config), remat=config.model.remat)
  step_cfg = step_lib.StepConfig(distill=mcfg.cosmos, ema_momentum=config.ema.momentum,
                                 ema_schedule=config.ema.schedule, ema_final=config.ema.final,
                                 total_steps=config.total_steps,
                                 in_place_student=(mesh.devices.size == 1
                                                   and mesh.devices.flat[0].platform == 'cpu'))
  batch_sh = partition.batch_sharding(mesh)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(model, tx, schedule, step_cfg),
                                       shardings, batch_sh)
  return StepBuild(config, mesh, mcfg, tx, shardings, batch_sh, train_step)


def pipeline_config(config: ml_collections.ConfigDict) -> pipeline.PipelineConfig:
  d = config.data
  return pipeline.PipelineConfig(
      global_batch_size=config.batch_size, seed=config.seed, worker_count=d.worker_count,
      text_mode=d.text_mode, max_bad_fraction=d.max_bad_fraction,
      multicrop=augment.MultiCropConfig(
          global_size=d.global_size, local_size=d.local_size, num_local=d.num_local,
          global_scale=tuple(d.global_scale), local_scale=tuple(d.local_scale)),
      textcrop=captions.TextCropConfig(max_global_sentences=d.max_global_sentences))


def open_train_source(config: ml_collections.ConfigDict):
  spec = config.data.train
  if spec.startswith('synthetic'):
    return open_source(spec, **config.data.synthetic.to_dict())
  return open_source(spec)
