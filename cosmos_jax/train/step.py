"""The jitted COSMOS train step, in the reference's order.

  student forward (all crops, all captions) and teacher forward (globals, stop_gradient)
  -> L = clip_loss + cosmos_loss -> grads
  -> teacher = EMA(teacher, student params BEFORE the update)
  -> AdamW update -> clamp logit_scale and distill_logit_scale of both trees to [0, ln 100].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cosmos_jax.data.augment import normalize
from cosmos_jax.losses import cosmos_objective
from cosmos_jax.models import CLIP
from cosmos_jax.train.ema import ema_update, momentum_at
from cosmos_jax.train import partition

LOGIT_SCALE_MAX = math.log(100)
SCALE_NAMES = ('logit_scale', 'distill_logit_scale')


@dataclasses.dataclass(frozen=True)
class StepConfig:
  distill: bool = True                 # False: the CLIP-only baseline (no teacher)
  ema_momentum: float = 0.999
  ema_schedule: str = 'fixed'          # or 'cosine' (to ema_final over total_steps)
  ema_final: float = 1.0
  total_steps: int = 1
  # The step's mesh and logical-axis rules: the activations are constrained to the batch
  # sharding through the rules; where the batch axes hold more than one device, the losses
  # run per device with explicit collectives (``losses_sharded``). None: no constraints, the
  # losses on global arrays.
  mesh: Optional[Mesh] = None
  rules: Sequence[tuple[str, Any]] = ()


class UpdateOrdering:
  """Where the donated trees' updates are placed in the step's data flow; values unchanged.

  The default places nothing: XLA:TPU writes the donated teacher and student in place as they
  are (the tiny step for v5e 2x2 needs no extra temporaries without any ordering, docs/
  backends.md). XLA:CPU copies a donated tree whose old value is read by ops its update does
  not depend on; its ordering (``xla_cpu/donation.py``) adds the dependencies.
  """

  def teacher_momentum(self, momentum: jax.Array, loss: jax.Array) -> jax.Array:
    return momentum

  def student_params(self, new_params: Any, grad_norm: jax.Array,
                     new_teacher: Optional[Any]) -> Any:
    return new_params


def clamp_logit_scales(params: dict) -> dict:
  params = dict(params)
  for name in SCALE_NAMES:
    if name in params:
      params[name] = jnp.clip(params[name], 0.0, LOGIT_SCALE_MAX)
  return params


def _images(x: jax.Array) -> jax.Array:
  """uint8 crops from the pipeline are normalised on device; float input is taken as is."""
  return normalize(x) if x.dtype == jnp.uint8 else x


def make_train_step(model: CLIP, tx: optax.GradientTransformation,
                    schedule: Callable[[Any], Any], cfg: StepConfig,
                    ordering: UpdateOrdering = UpdateOrdering()) -> Callable:
  """Returns ``train_step(state, batch) -> (state, metrics)`` (not yet jitted).

  batch: {'global': (B, 2, G, G, 3), 'local': (B, 6, L, L, 3), 'text': (B, 8, C)}.
  ``model`` runs the student; the teacher's forward, never differentiated, runs the plain
  stack of blocks.
  """
  teacher_model = model.clone(stack=None)

  def loss_fn(params, teacher_params, batch):
    globals_, locals_ = _images(batch['global']), _images(batch['local'])
    with partition.activation_rules(cfg.mesh, cfg.rules):
      student = model.apply({'params': params}, globals_, locals_, batch['text'],
                            method=CLIP.student)
      teacher = None
      if cfg.distill:
        teacher = teacher_model.apply({'params': teacher_params}, globals_, batch['text'],
                                      method=CLIP.teacher)
        teacher = jax.lax.stop_gradient(teacher)
    return cosmos_objective(student, teacher, distill=cfg.distill, mesh=cfg.mesh,
                            batch_axes=partition.BATCH_AXES)

  def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
    params = state['params']
    teacher_params = state.get('teacher_params')
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, teacher_params,
                                                                         batch)
    grad_norm = optax.tree.norm(grads)
    new_state = dict(state)
    new_teacher = None
    if cfg.distill:
      momentum = momentum_at(state['step'], cfg.ema_momentum, cfg.ema_schedule, cfg.total_steps,
                             cfg.ema_final)
      new_teacher = clamp_logit_scales(
          ema_update(teacher_params, params, ordering.teacher_momentum(momentum, loss)))
      new_state['teacher_params'] = new_teacher
      metrics['ema_momentum'] = momentum
    updates, new_state['opt_state'] = tx.update(grads, state['opt_state'], params)
    new_params = ordering.student_params(optax.apply_updates(params, updates), grad_norm,
                                         new_teacher)
    new_state['params'] = clamp_logit_scales(new_params)
    new_state['step'] = state['step'] + 1
    metrics['lr'] = schedule(state['step'])
    metrics['grad_norm'] = grad_norm
    for name in SCALE_NAMES:
      if name in params:
        metrics[name] = jnp.exp(new_state['params'][name])
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, state_shardings: Any, batch_sharding: Any,
                   metrics_sharding: Optional[Any] = None) -> Callable:
  """jit with the state donated; the state keeps its shardings across steps."""
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))
