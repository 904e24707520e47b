"""COSMOS losses against a PyTorch transcription of the official ClipLoss/COSMOSLoss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax import losses
from cosmos_jax.models.layers import l2_normalize
from cosmos_jax.train import partition

ref = pytest.importorskip('torch_reference')

# N = 16 splits over every mesh below (2, 4 and 8 rows per device).
N, E, VIEWS, TEACHER_VIEWS = 16, 16, 8, 2
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


@pytest.fixture(scope='module')
def torch_cosmos(torch_modules):
  """The reference's loss values and gradients for ``_features()``."""
  torch, _ = torch_modules
  student, teacher = _features()
  ts = {k: torch.tensor(v, requires_grad=True) for k, v in student.items()}
  tt = {k: torch.tensor(v, requires_grad=True) for k, v in teacher.items()}
  clip, distill, terms = _torch_cosmos(torch, ts, tt)
  (clip + distill).backward()
  return {
      'clip_loss': clip.item(), 'distill_loss': distill.item(),
      'total_loss': (clip + distill).item(),
      'terms': [t.item() for t in terms],
      'student_grads': {k: v.grad.numpy() for k, v in ts.items()},
      'teacher_grads': {k: v.grad for k, v in tt.items()},
  }


# Jitted once per input signature: eager lax.map would recompile every call.
_objective = jax.jit(losses.cosmos_objective, static_argnames='distill')


def _check_against_torch(expected, mesh=None):
  student, teacher = _features()
  js = jax.tree.map(jnp.asarray, student)
  jt = jax.tree.map(jnp.asarray, teacher)
  objective = lambda s, t: losses.cosmos_objective(s, t, mesh=mesh)
  (total, metrics), (g_s, g_t) = jax.jit(
      jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(js, jt)

  np.testing.assert_allclose(metrics['clip_loss'], expected['clip_loss'], atol=1e-5)
  np.testing.assert_allclose(metrics['distill_loss'], expected['distill_loss'], atol=1e-5)
  for name, value in zip(
      ('distill_i2i', 'distill_i2t', 'distill_t2i', 'distill_t2t'), expected['terms']):
    np.testing.assert_allclose(metrics[name], value, atol=1e-5)
  np.testing.assert_allclose(total, expected['total_loss'], atol=1e-5)
  np.testing.assert_allclose(metrics['total_loss'], total)
  for k in student:
    np.testing.assert_allclose(g_s[k], expected['student_grads'][k], atol=1e-5, err_msg=k)
  # The teacher is stop-gradient (detached in the reference).
  for k in teacher:
    assert expected['teacher_grads'][k] is None
    np.testing.assert_array_equal(g_t[k], 0.0)
  # Local image crops get no CLIP-loss gradient; they are not in the loss.
  np.testing.assert_array_equal(g_s['image_features'][2:], 0.0)


def _limit_pairs_per_group(monkeypatch, pairs_per_group, rows_per_device):
  """Sets the logits budget of one scan step to ``pairs_per_group`` (rows, N) blocks."""
  if pairs_per_group is not None:
    monkeypatch.setattr(losses, '_PAIR_LOGITS_BYTES',
                        pairs_per_group * 4 * rows_per_device * N)


# None: all 16 pairs of a term in one vectorised group (small batches); 1: one pair per
# scan step (batch 4096); 3: groups of three and a remainder of one.
@pytest.mark.parametrize('pairs_per_group', [None, 1, 3])
def test_matches_torch_values_and_gradients(torch_cosmos, monkeypatch, pairs_per_group):
  _limit_pairs_per_group(monkeypatch, pairs_per_group, N)
  _check_against_torch(torch_cosmos)


# The meshes of the train step's mesh-equivalence test, and (2, 4, 1): both batch axes split.
@pytest.mark.parametrize('pairs_per_group', [None, 1, 3])
@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2), (2, 4, 1)])
def test_sharded_matches_torch_values_and_gradients(torch_cosmos, monkeypatch, mesh_shape,
                                                    pairs_per_group):
  mesh = partition.make_mesh(mesh_shape)
  _limit_pairs_per_group(monkeypatch, pairs_per_group, N // (mesh_shape[0] * mesh_shape[1]))
  _check_against_torch(torch_cosmos, mesh)


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
      lambda v: (l2_normalize(v) * w).sum())(jnp.asarray(x))
  np.testing.assert_allclose(l2_normalize(jnp.asarray(x)),
                             ref.detach().numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(l2_normalize(jnp.asarray(x))[1], 0.0)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-5, atol=1e-6)
