"""Models: the COSMOS two-tower CLIP, its pieces and its named variants."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.models.cosmos import CLIP
from cosmos_jax.models.stacking import is_stacked, stack_layers, unstack_layers
from cosmos_jax.models.variants import (VARIANTS, ModelConfig, TextConfig, VisionConfig,
                                        from_open_clip_json, get_variant)

__all__ = ['CLIP', 'VARIANTS', 'ModelConfig', 'TextConfig', 'VisionConfig', 'build_model',
           'from_open_clip_json', 'get_variant', 'init_params', 'init_boxed_params', 'is_stacked',
           'stack_layers', 'unstack_layers']


def build_model(config: ModelConfig | str, *, dtype: Any = jnp.float32, remat: bool = False,
                attention: str = 'xla', scan_layers: bool = False) -> CLIP:
  if isinstance(config, str):
    config = get_variant(config)
  return CLIP(config, dtype=dtype, remat=remat, attention=attention, scan_layers=scan_layers)


def _dummy_inputs(config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  s = config.vision.image_size
  return (jnp.zeros((1, 1, s, s, 3), jnp.float32),
          jnp.zeros((1, 1, config.text.context_length), jnp.int32))


def init_boxed_params(config: ModelConfig, rng: jax.Array, scan_layers: bool = False) -> Any:
  """Parameters with their logical-axis boxes (``nn.LogicallyPartitioned``), for sharding
  (their shapes and names; values come from ``init_params``)."""
  return CLIP(config, scan_layers=scan_layers).init(rng, *_dummy_inputs(config),
                                                    method=CLIP.init_all)['params']


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(config: ModelConfig, rng: jax.Array, scan_layers: bool = False) -> dict:
  """Plain float32 parameters, initialised with the reference's distributions (spec 1.7).

  ``scan_layers``: the same values, in the scanned layout (``stacking.py``).
  """
  params = nn.unbox(init_boxed_params(config, rng))
  return stack_layers(params) if scan_layers else params
