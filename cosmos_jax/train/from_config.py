"""The objects a run is built from, read off its config (model, train step, data pipeline, source)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding

from cosmos_jax import config as config_lib
from cosmos_jax import models, xla_cpu
from cosmos_jax.data import augment, captions, pipeline
from cosmos_jax.data.sources import open_source
from cosmos_jax.models import attention as attention_lib
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
  tuning: xla_cpu.CpuTuning

  def after_first_step(self, state: dict) -> dict:
    """Called once the first step has run (compiled): the backend's chance to re-home it."""
    return self.tuning.after_first_step(state)

  def abstract_state(self) -> dict:
    """ShapeDtypeStructs with the state's shardings (a restore target; allocates nothing)."""
    return state_lib.abstract_state(self.shardings, self.model, self.tx,
                                    with_teacher=self.model.cosmos,
                                    scan_layers=self.config.model.scan_layers)

  def init_state(self, seed: int) -> dict:
    init = jax.jit(lambda key: state_lib.init_state(self.model, self.tx, key,
                                                    with_teacher=self.model.cosmos,
                                                    scan_layers=self.config.model.scan_layers),
                   out_shardings=self.shardings)
    return init(jax.random.key(seed))


def mesh_platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices (not the default backend's: a TPU program compiled
  ahead of time on a CPU host has TPU devices in its mesh)."""
  return mesh.devices.flat[0].platform


def build_model(config: ml_collections.ConfigDict, mesh: Mesh,
                tuning: Optional[xla_cpu.CpuTuning] = None) -> models.CLIP:
  """The CLIP the step trains, with the kernels and body form chosen for the mesh."""
  dtype = compute_dtype(config)
  attention = attention_lib.resolve(config.model.attention, mesh_platform(mesh), dtype)
  return models.CLIP(model_config(config), dtype=dtype, remat=config.model.remat,
                     attention=attention, scan_layers=config.model.scan_layers,
                     stack=tuning.stack if tuning else None)


def build_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> StepBuild:
  mcfg = model_config(config)
  tx, schedule = optim.optimizer_from_config(config.optim, config.total_steps)
  rules = config_lib.logical_rules(config)
  shardings = state_lib.state_shardings(mcfg, tx, mesh, rules, with_teacher=mcfg.cosmos,
                                        scan_layers=config.model.scan_layers)
  tuning = xla_cpu.resolve(config.perf.cpu_tuning, mesh)
  model = build_model(config, mesh, tuning)
  step_cfg = step_lib.StepConfig(distill=mcfg.cosmos, ema_momentum=config.ema.momentum,
                                 ema_schedule=config.ema.schedule, ema_final=config.ema.final,
                                 total_steps=config.total_steps, mesh=mesh, rules=rules)
  batch_sh = partition.batch_sharding(mesh)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, schedule, step_cfg, tuning.ordering),
      shardings, batch_sh)
  return StepBuild(config, mesh, mcfg, tx, shardings, batch_sh, train_step, tuning)


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
