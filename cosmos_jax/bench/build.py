"""The train step as training builds it, for timing and for memory: one definition for both.

The step is jitted exactly as the training loop does it (state shardings in and out, the
state donated), so the time and the compiled memory are those of a real run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from cosmos_jax import config as config_lib
from cosmos_jax import models
from cosmos_jax.train import optim, partition
from cosmos_jax.train import state as state_lib
from cosmos_jax.train import step as step_lib
from cosmos_jax.train.from_config import model_config

NUM_CAPTIONS = 8   # the pipeline's text crop: 2 global + 6 local captions per sample
EOT_ID = 49407


@dataclasses.dataclass
class StepBuild:
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: models.ModelConfig
  tx: Any
  shardings: dict
  batch_sharding: NamedSharding
  train_step: Callable   # jitted, state donated


def build_step(config: ml_collections.ConfigDict, mesh: Mesh) -> StepBuild:
  mcfg = model_config(config)
  tx, schedule = optim.optimizer_from_config(config.optim, config.total_steps)
  distill = mcfg.cosmos
  shardings = state_lib.state_shardings(mcfg, tx, mesh, config_lib.logical_rules(config),
                                        with_teacher=distill)
  dtype = jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32
  model = models.CLIP(mcfg, dtype=dtype, remat=config.model.remat)
  step_cfg = step_lib.StepConfig(distill=distill, ema_momentum=config.ema.momentum,
                                 ema_schedule=config.ema.schedule, ema_final=config.ema.final,
                                 total_steps=config.total_steps)
  batch_sh = partition.batch_sharding(mesh)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(model, tx, schedule, step_cfg),
                                       shardings, batch_sh)
  return StepBuild(config, mesh, mcfg, tx, shardings, batch_sh, train_step)


def batch_shapes(config: ml_collections.ConfigDict, mcfg: models.ModelConfig,
                 batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shapes and dtypes of a pipeline batch: uint8 crops, int32 token ids."""
  d, b = config.data, batch_size
  return {'global': ((b, 2, d.global_size, d.global_size, 3), np.uint8),
          'local': ((b, d.num_local, d.local_size, d.local_size, 3), np.uint8),
          'text': ((b, NUM_CAPTIONS, mcfg.text.context_length), np.int32)}


def abstract_inputs(build: StepBuild, batch_size: int) -> tuple[dict, dict]:
  """ShapeDtypeStructs with shardings for (state, batch): compiling them allocates nothing."""
  state = state_lib.abstract_state(build.shardings, build.model, build.tx,
                                   with_teacher=build.model.cosmos)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=build.batch_sharding)
           for k, (shape, dtype) in batch_shapes(build.config, build.model, batch_size).items()}
  return state, batch


def concrete_inputs(build: StepBuild, batch_size: int, seed: int = 0) -> tuple[dict, dict]:
  """A freshly initialised sharded state and a random batch (uniform pixels, EOT-ended text)."""
  init = jax.jit(lambda key: state_lib.init_state(build.model, build.tx, key,
                                                  with_teacher=build.model.cosmos),
                 out_shardings=build.shardings)
  state = init(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  batch = {}
  for name, (shape, dtype) in batch_shapes(build.config, build.model, batch_size).items():
    high = 256 if dtype == np.uint8 else EOT_ID - 1
    batch[name] = rng.integers(1 if name == 'text' else 0, high, shape).astype(dtype)
  batch['text'][..., -1] = EOT_ID
  return state, jax.device_put(batch, build.batch_sharding)
