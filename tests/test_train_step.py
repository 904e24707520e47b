"""The train step against a PyTorch step in the reference's order, and across mesh shapes."""

import copy
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cosmos_jax import models
from cosmos_jax.convert.mapping import flax_to_torch, torch_to_flax
from cosmos_jax.train import optim, partition, state as state_lib, step as step_lib
from cosmos_jax.xla_cpu.donation import InPlaceOrdering

torch = pytest.importorskip('torch')
ref = pytest.importorskip('torch_reference')

CFG = models.get_variant('tiny')
B = 4


def make_batch(seed, batch=B, normalized=True):
  rng = np.random.default_rng(seed)
  if normalized:
    g = rng.standard_normal((batch, 2, 32, 32, 3)).astype(np.float32)
    l = rng.standard_normal((batch, 6, 16, 16, 3)).astype(np.float32)
  else:
    g = rng.integers(0, 256, (batch, 2, 32, 32, 3), dtype=np.uint8)
    l = rng.integers(0, 256, (batch, 6, 16, 16, 3), dtype=np.uint8)
  text = np.zeros((batch, 8, 77), np.int32)
  for i in range(batch):
    for v in range(8):
      n = int(rng.integers(1, 20))
      text[i, v, 0] = 49406
      text[i, v, 1:n + 1] = rng.integers(1, 49406, n)
      text[i, v, n + 1] = 49407
  return {'global': g, 'local': l, 'text': text}


def to_torch_inputs(batch):
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  images = [nchw(batch['global'][:, v]) for v in range(2)]
  images += [nchw(batch['local'][:, v]) for v in range(6)]
  texts = torch.from_numpy(batch['text'].transpose(1, 0, 2).reshape(-1, 77).astype(np.int64))
  return images, texts


def max_diff(flax_params, torch_model, skip_key_bias=False):
  """Max abs difference over all tensors.

  ``skip_key_bias`` leaves out the key third of every ``in_proj_bias``: its gradient is zero
  in exact arithmetic (softmax ignores a constant added to all logits of a query), so both
  implementations see float noise there, which Adam's first step scales to +-lr.
  """
  sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  ours = flax_to_torch(jax.device_get(flax_params), CFG)
  diffs = {k: np.abs(ours[k] - sd[k]) for k in sd}
  if skip_key_bias:
    for k, d in diffs.items():
      if k.endswith('in_proj_bias'):
        third = d.shape[0] // 3
        diffs[k] = np.concatenate([d[:third], d[2 * third:]])
  return max(float(np.max(d)) for d in diffs.values())


def test_decay_mask_matches_reference_groups():
  """108 decayed / 215 not for the COSMOS ViT-B/16 (spec 4.1), and the same tensors by name."""
  cfg = models.get_variant('ViT-B-16')
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
  mask = optim.decay_mask(shapes)
  leaves = jax.tree.leaves(mask)
  assert (sum(leaves), len(leaves) - sum(leaves)) == (108, 215)
  torch_mask = flax_to_torch(jax.tree.map(lambda m, s: np.full(s.shape, m), mask, shapes), cfg)
  for key, m in torch_mask.items():
    excluded = m.ndim < 2 or any(s in key for s in ('bn', 'ln', 'bias', 'logit_scale'))
    assert bool(np.all(m)) == (not excluded), key


def test_schedule_is_the_reference_formula():
  sched = optim.warmup_cosine(5e-4, 2000, 10000)
  for step in (0, 1, 999, 1999):
    assert float(sched(step)) == pytest.approx(5e-4 * (step + 1) / 2000, rel=1e-6)
  for step in (2000, 5000, 9999):
    expected = 0.5 * (1 + math.cos(math.pi * (step - 2000) / 8000)) * 5e-4
    assert float(sched(step)) == pytest.approx(expected, rel=1e-5, abs=1e-10)  # float32 cos near 0


def test_adamw_matches_torch_with_the_same_gradients():
  """optax side of the update vs torch.optim.AdamW with the official parameter groups."""
  model = ref.build(CFG, seed=1)
  params = jax.tree.map(jnp.asarray, torch_to_flax(model.state_dict(), CFG))
  lr, wd = 1e-2, 0.5
  tx, _ = optim.make_optimizer(lr, 0.9, 0.98, 1e-8, wd, warmup_steps=1, total_steps=10**9)
  opt = torch.optim.AdamW(ref.adamw_param_groups(model, wd), lr=lr, betas=(0.9, 0.98), eps=1e-8)
  opt_state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  rng = np.random.default_rng(0)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) * 1e-2,
                         params)
    torch_grads = flax_to_torch(jax.device_get(grads), CFG)
    for name, p in model.named_parameters():
      p.grad = torch.from_numpy(np.array(torch_grads[name], np.float32))
    opt.step()
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  assert max_diff(params, model) <= 1e-6


def test_one_step_matches_the_pytorch_reference_step():
  """Forward, losses, backward, EMA before the update, AdamW, clamps of both trees."""
  student_t = ref.build(CFG, seed=2)
  with torch.no_grad():  # Above the clamp, so the clamp of both trees is exercised.
    student_t.logit_scale.fill_(math.log(100) + 0.5)
  teacher_t = copy.deepcopy(student_t)
  lr, wd, momentum = 1e-4, 0.5, 0.5   # momentum 0.5 makes the EMA order visible
  opt = torch.optim.AdamW(ref.adamw_param_groups(student_t, wd), lr=lr, betas=(0.9, 0.98),
                          eps=1e-8)
  params = jax.tree.map(jnp.asarray, torch_to_flax(student_t.state_dict(), CFG))
  batch = make_batch(0)
  images, texts = to_torch_inputs(batch)
  loss_t = ref.train_step(student_t, teacher_t, opt, images, texts, B, momentum)

  tx, schedule = optim.make_optimizer(lr, 0.9, 0.98, 1e-8, wd, warmup_steps=1, total_steps=100)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
           'teacher_params': jax.tree.map(jnp.copy, params)}
  train_step = step_lib.make_train_step(models.CLIP(CFG), tx, schedule,
                                        step_lib.StepConfig(ema_momentum=momentum))
  before = jax.device_get(params)
  state, metrics = jax.jit(train_step)(state, jax.tree.map(jnp.asarray, batch))
  assert float(metrics['total_loss']) == pytest.approx(float(loss_t), abs=1e-5)
  assert max_diff(state['params'], student_t, skip_key_bias=True) <= 1e-5
  assert max_diff(state['teacher_params'], teacher_t) <= 1e-5
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state['params'],
                       before)
  assert max(jax.tree.leaves(moved)) > 5e-5   # the update is far above the tolerance
  for tree in ('params', 'teacher_params'):
    assert float(state[tree]['logit_scale']) == pytest.approx(math.log(100))
  assert int(state['step']) == 1


def _run(mesh_shape, rules, steps=3):
  # Adam's eps at 1e-5 here: with 1e-8, elements whose gradient is tiny turn reduction-order
  # noise (~1e-9 between meshes) into update differences of order lr, since Adam's first steps
  # move every element by about lr whatever its gradient's size. The comparison is about
  # sharding, so it uses a well-conditioned optimizer (typical gradients are still >> eps).
  tx, schedule = optim.make_optimizer(3e-4, 0.9, 0.98, 1e-5, 0.5, warmup_steps=1, total_steps=10)
  if mesh_shape is None:
    mesh = partition.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  else:
    mesh = partition.make_mesh(mesh_shape)
  state, shardings = state_lib.create_state(CFG, tx, mesh, partition.resolve_rules(rules),
                                            jax.random.key(0))
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(models.CLIP(CFG), tx, schedule, step_lib.StepConfig()),
      shardings, partition.batch_sharding(mesh))
  losses = []
  with jax.set_mesh(mesh):
    for i in range(steps):
      batch = jax.device_put(make_batch(10 + i, batch=8, normalized=False),
                             partition.batch_sharding(mesh))
      state, metrics = fn(state, batch)
      losses.append(float(metrics['total_loss']))
  return losses, jax.device_get(state), shardings


@pytest.fixture(scope='module')
def single_device_run():
  return _run(None, 'dp')


@pytest.mark.xdist_group('single_device_run')   # its reference run computed once
@pytest.mark.parametrize('mesh_shape,rules', [((8, 1, 1), 'dp'), ((1, 8, 1), 'fsdp'),
                                              ((2, 2, 2), 'fsdp_tp'), ((1, 4, 2), 'fsdp_tp')])
def test_meshes_agree_with_one_device(single_device_run, mesh_shape, rules):
  losses1, state1, _ = single_device_run
  losses, state, shardings = _run(mesh_shape, rules)
  np.testing.assert_allclose(losses, losses1, atol=1e-5)
  def diff(path, a, b):
    d = np.abs(np.asarray(a) - np.asarray(b))
    if 'in_proj_bias' in optim.path_name(path):   # see max_diff: the key third is float noise
      d = np.concatenate([d[:d.shape[0] // 3], d[2 * d.shape[0] // 3:]])
    return float(np.max(d)) if d.size else 0.0
  diffs = jax.tree_util.tree_map_with_path(diff, state, state1)
  assert max(jax.tree.leaves(diffs)) <= 1e-5
  # The teacher and the Adam moments carry the student's shardings.
  assert shardings['teacher_params'] == shardings['params']


@pytest.mark.parametrize('distill', [True, False])
def test_donated_state_is_updated_in_place(distill):
  """On one CPU device, the compiled step copies no donated parameter array before updating it.

  XLA:CPU copies a donated leaf whose readers are not all data inputs of its update: without
  its ``InPlaceOrdering``, the teacher (read by the teacher forward) and the student (read by
  the backward and the EMA). Scalars (the logit scales, which are clamped) may be copied.
  """
  tx, schedule = optim.make_optimizer(1e-3, 0.9, 0.98, 1e-8, 0.5, 1, 10)
  mesh = partition.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  cfg = CFG if distill else dataclasses.replace(CFG, cosmos=False)
  state, shardings = state_lib.create_state(cfg, tx, mesh, partition.resolve_rules('dp'),
                                            jax.random.key(0), with_teacher=distill)
  batch = jax.device_put(make_batch(0, normalized=False), partition.batch_sharding(mesh))

  def copied(in_place):
    step_cfg = step_lib.StepConfig(distill=distill)
    ordering = InPlaceOrdering() if in_place else step_lib.UpdateOrdering()
    fn = step_lib.jit_train_step(
        step_lib.make_train_step(models.CLIP(cfg), tx, schedule, step_cfg, ordering),
        shardings, partition.batch_sharding(mesh))
    with jax.set_mesh(mesh):
      hlo = fn.lower(state, batch).compile().as_text()
    return {tree for shape, tree in re.findall(r'= (\S+?)(?:\{\S*\})? copy\(%state__(\w+?)__', hlo)
            if shape not in ('f32[]', 's32[]')}

  if not distill:   # the check sees XLA's copies (shown once: each case compiles a step)
    assert copied(in_place=False) == {'params'}
  assert copied(in_place=True) == set()


def test_fsdp_memory_per_device():
  """State bytes per device under FSDP over 8 devices <= replicated / 8 + 10%."""
  tx, _ = optim.make_optimizer(1e-3, 0.9, 0.98, 1e-8, 0.5, 1, 10)

  def state_bytes(shape, rules):
    mesh = partition.make_mesh(shape)
    shardings = state_lib.state_shardings(CFG, tx, mesh, partition.resolve_rules(rules))
    init = jax.jit(lambda k: state_lib.init_state(CFG, tx, k), out_shardings=shardings)
    return init.lower(jax.random.key(0)).compile().memory_analysis().output_size_in_bytes

  replicated = state_bytes((8, 1, 1), 'dp')
  sharded = state_bytes((1, 8, 1), 'fsdp')
  assert sharded <= 1.1 * replicated / 8, (sharded, replicated)


def test_bad_mesh_and_batch_are_rejected_before_compiling():
  with pytest.raises(ValueError, match=r'needs 12 devices but 8 are available'):
    partition.make_mesh((3, 2, 2))
  with pytest.raises(ValueError, match=r'at most one -1'):
    partition.make_mesh((-1, -1, 1))
  mesh = partition.make_mesh((4, 2, 1))
  with pytest.raises(ValueError, match=r'global batch size 12 is not divisible by the '
                                       r'data-parallel size 8'):
    partition.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match='unknown sharding rules preset'):
    partition.resolve_rules('zero3')
