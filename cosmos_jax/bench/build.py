"""Inputs for the train step that training builds (``train.from_config.build_train_step``).

The step is jitted exactly as the training loop does it (state shardings in and out, the
state donated), so the time and the compiled memory are those of a real run.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from cosmos_jax import models
from cosmos_jax.train.from_config import StepBuild

NUM_CAPTIONS = 8   # the pipeline's text crop: 2 global + 6 local captions per sample
EOT_ID = 49407


def batch_shapes(config: ml_collections.ConfigDict, mcfg: models.ModelConfig,
                 batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shapes and dtypes of a pipeline batch: uint8 crops, int32 token ids."""
  d, b = config.data, batch_size
  return {'global': ((b, 2, d.global_size, d.global_size, 3), np.uint8),
          'local': ((b, d.num_local, d.local_size, d.local_size, 3), np.uint8),
          'text': ((b, NUM_CAPTIONS, mcfg.text.context_length), np.int32)}


def abstract_inputs(build: StepBuild, batch_size: int) -> tuple[dict, dict]:
  """ShapeDtypeStructs with shardings for (state, batch): compiling them allocates nothing."""
  state = build.abstract_state()
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=build.batch_sharding)
           for k, (shape, dtype) in batch_shapes(build.config, build.model, batch_size).items()}
  return state, batch


def concrete_inputs(build: StepBuild, batch_size: int, seed: int = 0) -> tuple[dict, dict]:
  """A freshly initialised sharded state and a random batch (uniform pixels, EOT-ended text)."""
  state = build.init_state(seed)
  rng = np.random.default_rng(seed)
  batch = {}
  for name, (shape, dtype) in batch_shapes(build.config, build.model, batch_size).items():
    high = 256 if dtype == np.uint8 else EOT_ID - 1
    batch[name] = rng.integers(1 if name == 'text' else 0, high, shape).astype(dtype)
  batch['text'][..., -1] = EOT_ID
  return state, jax.device_put(batch, build.batch_sharding)
