"""The train state: a plain pytree {step, params, teacher_params, opt_state}, created sharded."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cosmos_jax import models
from cosmos_jax.models.variants import ModelConfig
from cosmos_jax.train import partition


def state_shardings(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: partition.Rules, *, with_teacher: bool = True,
                    scan_layers: bool = False) -> dict:
  """Shardings of the state: the teacher and the Adam moments carry the student's."""
  boxed = jax.eval_shape(lambda: models.init_boxed_params(config, jax.random.key(0),
                                                          scan_layers))
  params_sh = partition.logical_shardings(boxed, mesh, rules)
  opt_shapes = jax.eval_shape(tx.init, nn.unbox(boxed))
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_shapes, params_sh,
                                 transform_non_params=lambda _: NamedSharding(mesh, P()))
  shardings = {'step': NamedSharding(mesh, P()), 'params': params_sh, 'opt_state': opt_sh}
  if with_teacher:
    shardings['teacher_params'] = params_sh
  return shardings


def init_state(config: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array, *,
               with_teacher: bool = True, scan_layers: bool = False) -> dict:
  params = models.init_params(config, rng, scan_layers)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
  if with_teacher:
    # An exact copy, as the reference's deepcopy(student).
    state['teacher_params'] = jax.tree.map(jnp.copy, params)
  return state


def create_state(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                 rules: partition.Rules, rng: jax.Array, *,
                 with_teacher: bool = True) -> tuple[dict, dict]:
  """Materialises the state directly in its shardings (never whole on one device)."""
  shardings = state_shardings(config, tx, mesh, rules, with_teacher=with_teacher)
  init = jax.jit(lambda key: init_state(config, tx, key, with_teacher=with_teacher),
                 out_shardings=shardings)
  return init(rng), shardings


def abstract_state(shardings: dict, config: ModelConfig, tx: optax.GradientTransformation, *,
                   with_teacher: bool = True, scan_layers: bool = False) -> dict:
  """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint."""
  shapes = jax.eval_shape(lambda: init_state(config, tx, jax.random.key(0),
                                             with_teacher=with_teacher,
                                             scan_layers=scan_layers))
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      shapes, shardings)


def param_count(params: Any, only: Optional[str] = None) -> int:
  return sum(x.size for x in jax.tree.leaves(params if only is None else params[only]))
