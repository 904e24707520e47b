"""The jitted COSMOS train step, in the reference's order.

  student forward (all crops, all captions) and teacher forward (globals, stop_gradient)
  -> L = clip_loss + cosmos_loss -> grads
  -> teacher = EMA(teacher, student params BEFORE the update)
  -> AdamW update -> clamp logit_scale and distill_logit_scale of both trees to [0, ln 100].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from cosmos_jax.data.augment import normalize
from cosmos_jax.losses import cosmos_objective
from cosmos_jax.models import CLIP
from cosmos_jax.train.ema import ema_update, momentum_at

LOGIT_SCALE_MAX = math.log(100)
SCALE_NAMES = ('logit_scale', 'distill_logit_scale')


@dataclasses.dataclass(frozen=True)
class StepConfig:
  distill: bool = True                 # False: the CLIP-only baseline (no teacher)
  ema_momentum: float = 0.999
  ema_schedule: str = 'fixed'          # or 'cosine' (to ema_final over total_steps)
  ema_final: float = 1.0
  total_steps: int = 1
  # Orders the student's update after its other readers so that XLA updates it in place (see
  # ``train_step``). It reads one element of each teacher leaf, a collective where the leaf is
  # sharded, so ``build_train_step`` turns it on for one-device CPU meshes only.
  in_place_student: bool = False


def clamp_logit_scales(params: dict) -> dict:
  params = dict(params)
  for name in SCALE_NAMES:
    if name in params:
      params[name] = jnp.clip(params[name], 0.0, LOGIT_SCALE_MAX)
  return params


def _after(*scalars: jax.Array) -> jax.Array:
  """A zero computed from ``scalars``, so that adding it orders an op after them (not folded
  away by XLA; NaN only where a scalar is NaN, never for an infinite one)."""
  return jnp.minimum(sum(jnp.abs(x) for x in scalars), 0)


def _images(x: jax.Array) -> jax.Array:
  """uint8 crops from the pipeline are normalised on device; float input is taken as is."""
  return normalize(x) if x.dtype == jnp.uint8 else x


def make_train_step(model: CLIP, tx: optax.GradientTransformation,
                    schedule: Callable[[Any], Any], cfg: StepConfig) -> Callable:
  """Returns ``train_step(state, batch) -> (state, metrics)`` (not yet jitted).

  batch: {'global': (B, 2, G, G, 3), 'local': (B, 6, L, L, 3), 'text': (B, 8, C)}.
  """

  def loss_fn(params, teacher_params, batch):
    globals_, locals_ = _images(batch['global']), _images(batch['local'])
    student = model.apply({'params': params}, globals_, locals_, batch['text'],
                          method=CLIP.student)
    teacher = None
    if cfg.distill:
      teacher = model.apply({'params': teacher_params}, globals_, batch['text'],
                            method=CLIP.teacher)
      teacher = jax.lax.stop_gradient(teacher)
    return cosmos_objective(student, teacher, distill=cfg.distill)

  def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
    params = state['params']
    teacher_params = state.get('teacher_params')
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, teacher_params,
                                                                         batch)
    grad_norm = optax.tree.norm(grads)
    new_state = dict(state)
    # In-place updates of the donated trees. XLA writes a donated leaf in place only when all
    # its readers come first in the data flow; otherwise it copies the leaf at the start of the
    # step (ViT-B/16: 600 MB per tree). `_after` adds a zero that makes those readers inputs:
    # the teacher forward (via the loss) for the EMA, and for the student the backward (via
    # the gradient norm) and the EMA (via one element of each new teacher leaf).
    new_teacher = None
    if cfg.distill:
      momentum = momentum_at(state['step'], cfg.ema_momentum, cfg.ema_schedule, cfg.total_steps,
                             cfg.ema_final)
      new_teacher = clamp_logit_scales(
          ema_update(teacher_params, params, momentum + _after(loss)))
      new_state['teacher_params'] = new_teacher
      metrics['ema_momentum'] = momentum
    updates, new_state['opt_state'] = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    if cfg.in_place_student:
      if new_teacher is None:
        new_params = jax.tree.map(lambda p: p + _after(grad_norm), new_params)
      else:
        first = lambda t: t.reshape(-1)[0] if t.size else jnp.zeros((), t.dtype)
        new_params = jax.tree.map(lambda p, t: p + _after(grad_norm, first(t)), new_params,
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
