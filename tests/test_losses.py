"""COSMOS losses against a PyTorch transcription of the official ClipLoss/COSMOSLoss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax import losses

ref = pytest.importorskip('torch_reference')

N, E, VIEWS, TEACHER_VIEWS = 6, 16, 8, 2
LOGIT_SCALE = math.log(1 / 0.07)
DISTILL_LOGIT_SCALE = math.log(1 / 0.07) + 0.3  # Distinct, to catch mix-ups.
STUDENT_KEYS = ('image_features', 'text_features', 'image_cross', 'text_cross')


def _torch_cosmos(torch, s, t):
  """Official COSMOSLoss.forward (chunked lists, teacher detached)."""
  scale = s['logit_scale'].exp()
  d_scale = s['distill_logit_scale'].exp()
  t_img = [x.detach() for x in t['image_features'].unbind(0)]
  t_txt = [x.detach() for x in t['text_features'].unbind(0)]
  c_img = list(s['image_cross'].unbind(0))
  c_txt = list(s['text_cross'].unbind(0))
  terms = [
      ref.clip_loss(c_img, t_img, d_scale),
      ref.clip_loss(c_img, t_txt, d_scale),
      ref.clip_loss(c_txt, t_img, d_scale),
      ref.clip_loss(c_txt, t_txt, d_scale),
  ]
  distill = sum(terms) / 4
  clip = ref.clip_loss(list(s['image_features'].unbind(0))[:2],
                          list(s['text_features'].unbind(0)), scale)
  return clip, distill, terms


def _features(seed: int = 0):
  rng = np.random.default_rng(seed)
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  student = {k: norm(rng.standard_normal((VIEWS, N, E))).astype(np.float32)
             for k in STUDENT_KEYS}
  student['logit_scale'] = np.float32(LOGIT_SCALE)
  student['distill_logit_scale'] = np.float32(DISTILL_LOGIT_SCALE)
  teacher = {
      k: norm(rng.standard_normal((TEACHER_VIEWS, N, E))).astype(np.float32)
      for k in ('image_features', 'text_features')}
  return student, teacher


def _jax_total(student, teacher):
  return losses.cosmos_objective(student, teacher)


# Jitted once per input signature: eager lax.map would recompile every call.
_objective = jax.jit(losses.cosmos_objective, static_argnames='distill')


# None: all 16 pairs of a term in one vectorised group (small batches); 1: one pair per
# scan step (batch 4096); 3: groups of three and a remainder of one.
@pytest.mark.parametrize('pairs_per_group', [None, 1, 3])
def test_matches_torch_values_and_gradients(torch_modules, monkeypatch, pairs_per_group):
  torch, _ = torch_modules
  if pairs_per_group is not None:
    monkeypatch.setattr(losses, '_PAIR_LOGITS_BYTES', pairs_per_group * 4 * N * N)
  student, teacher = _features()
  ts = {k: torch.tensor(v, requires_grad=True) for k, v in student.items()}
  tt = {k: torch.tensor(v, requires_grad=True) for k, v in teacher.items()}
  clip, distill, terms = _torch_cosmos(torch, ts, tt)
  (clip + distill).backward()

  js = jax.tree.map(jnp.asarray, student)
  jt = jax.tree.map(jnp.asarray, teacher)
  (total, metrics), (g_s, g_t) = jax.jit(
      jax.value_and_grad(_jax_total, argnums=(0, 1), has_aux=True))(js, jt)

  np.testing.assert_allclose(metrics['clip_loss'], clip.item(), atol=1e-5)
  np.testing.assert_allclose(metrics['distill_loss'], distill.item(), atol=1e-5)
  for name, ref in zip(
      ('distill_i2i', 'distill_i2t', 'distill_t2i', 'distill_t2t'), terms):
    np.testing.assert_allclose(metrics[name], ref.item(), atol=1e-5)
  np.testing.assert_allclose(total, (clip + distill).item(), atol=1e-5)
  np.testing.assert_allclose(metrics['total_loss'], total)
  for k in student:
    np.testing.assert_allclose(g_s[k], ts[k].grad.numpy(), atol=1e-5,
                               err_msg=k)
  # The teacher is stop-gradient (detached in the reference).
  for k in teacher:
    assert tt[k].grad is None
    np.testing.assert_array_equal(g_t[k], 0.0)
  # Local image crops get no CLIP-loss gradient; they are not in the loss.
  np.testing.assert_array_equal(g_s['image_features'][2:], 0.0)


def test_closed_form_two_orthonormal_samples():
  s = 5.0
  eye = jnp.eye(2, dtype=jnp.float32)[None]  # (1 view, N=2, E=2)
  # logits = s on the diagonal, 0 off it: each CE row is log(1 + e^-s).
  np.testing.assert_allclose(
      losses.clip_loss(eye, eye, jnp.float32(s)), math.log1p(math.exp(-s)),
      atol=1e-7)
  # Against -I the positives score -s: log(1 + e^s); pairs are averaged.
  b = jnp.concatenate([eye, -eye])
  expected = (math.log1p(math.exp(-s)) + math.log1p(math.exp(s))) / 2
  np.testing.assert_allclose(
      losses.clip_loss(eye, b, jnp.float32(s)), expected, atol=1e-6)


def test_clip_loss_ignores_local_image_views():
  student, teacher = _features(1)
  _, base = _objective(student, teacher)
  changed = dict(student)
  changed['image_features'] = student['image_features'].copy()
  changed['image_features'][2:] = -changed['image_features'][2:]
  _, other = _objective(changed, teacher)
  assert float(other['clip_loss']) == float(base['clip_loss'])


def test_clip_only_baseline():
  student, _ = _features(2)
  total, metrics = _objective(student, None, distill=False)
  assert set(metrics) == {'clip_loss', 'total_loss'}
  np.testing.assert_allclose(total, metrics['clip_loss'])
  with pytest.raises(ValueError):
    losses.cosmos_objective(student, None)


def test_float32_inside_for_bfloat16_features():
  student, teacher = _features(3)
  student16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in student.items()}
  total, _ = _objective(student16, teacher)
  assert total.dtype == jnp.float32


def test_l2_normalize_matches_torch(torch_modules):
  torch, _ = torch_modules
  x = np.random.default_rng(4).standard_normal((4, E)).astype(np.float32)
  x[1] = 0.0  # torch clamps the norm to eps: the zero vector stays zero.
  x[2] *= 1e-14  # a norm below eps.
  w = np.random.default_rng(5).standard_normal((4, E)).astype(np.float32)
  tx = torch.tensor(x, requires_grad=True)
  ref = torch.nn.functional.normalize(tx, dim=-1)
  (ref * torch.tensor(w)).sum().backward()
  out, grad = jax.value_and_grad(
      lambda v: (losses.l2_normalize(v) * w).sum())(jnp.asarray(x))
  np.testing.assert_allclose(losses.l2_normalize(jnp.asarray(x)),
                             ref.detach().numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(losses.l2_normalize(jnp.asarray(x))[1], 0.0)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-5, atol=1e-6)
