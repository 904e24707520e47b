"""The towers' training shortcuts change nothing: the CPU stack workarounds (stored cotangents
between blocks; the scanned stack with remat) and the last block computed only where it is read
(``token_stride``) give the plain unrolled forward's values and gradients, for the student and
the teacher. The stored cotangents survive XLA's simplifier and keep the backward's fusions
small."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax import models
from cosmos_jax.models import CLIP, layers

TINY = models.get_variant('tiny')


def deep_tiny(n_layers):
  return TINY.replace(vision=dataclasses.replace(TINY.vision, layers=n_layers),
                      text=dataclasses.replace(TINY.text, layers=n_layers))


def batch(b=3, seed=0):
  rng = np.random.default_rng(seed)
  text = np.zeros((b, 8, 77), np.int32)
  for i in range(b):
    for v in range(8):   # EOTs at different positions: the pooled index differs per row
      n = int(rng.integers(3, 40))
      text[i, v, 0], text[i, v, n] = 49406, 49407
      text[i, v, 1:n] = rng.integers(1, 49000, n - 1)
  return (jnp.asarray(rng.standard_normal((b, 2, 32, 32, 3)), jnp.float32),
          jnp.asarray(rng.standard_normal((b, 6, 16, 16, 3)), jnp.float32),
          jnp.asarray(text))


def plain_towers(monkeypatch):
  """Turns every shortcut off: full last blocks (tokens then strided), no CPU workarounds."""
  from cosmos_jax.models import text, vision
  orig_v, orig_t = vision.VisionTransformer.__call__, text.TextTransformer.__call__

  def strided(aux, s):
    return aux if s is None else dict(aux, tokens=aux['tokens'][::s] if s else aux['tokens'][:0])

  def v_call(self, x, *, csa=False, token_stride=None, differentiated=False):
    pooled, aux = orig_v(self, x, csa=csa)
    return pooled, strided(aux, token_stride)

  def t_call(self, x, *, token_stride=None, differentiated=False):
    pooled, aux = orig_t(self, x)
    return pooled, strided(aux, token_stride)

  monkeypatch.setattr(vision.VisionTransformer, '__call__', v_call)
  monkeypatch.setattr(text.TextTransformer, '__call__', t_call)


@pytest.mark.parametrize('n_layers,remat', [(2, False), (6, False), (6, True)])
def test_student_and_teacher_match_the_plain_forward(n_layers, remat, monkeypatch):
  monkeypatch.setattr(layers, 'cpu_stack_workarounds_here', lambda: True)   # 8 host devices
  cfg = deep_tiny(n_layers)
  model = CLIP(cfg, remat=remat)
  params = models.init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
  g, l, t = batch()

  def run(p):
    s = model.apply({'params': p}, g, l, t, method=CLIP.student)
    te = model.apply({'params': p}, g, t, method=CLIP.teacher)
    loss = sum(jnp.sum(jnp.sin(3 * x)) for x in jax.tree.leaves((s, te)))
    return loss, (s, te)

  (_, out), grads = jax.value_and_grad(run, has_aux=True)(params)
  with monkeypatch.context() as m:
    plain_towers(m)
    (_, ref_out), ref_grads = jax.value_and_grad(run, has_aux=True)(params)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref_grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale)


def test_token_stride_returns_view_zero_tokens(monkeypatch):
  monkeypatch.setattr(layers, 'cpu_stack_workarounds_here', lambda: True)
  cfg = deep_tiny(6)
  model = CLIP(cfg)
  params = models.init_params(cfg, jax.random.key(0))
  _, _, t = batch()
  rows = t.reshape(-1, 77)
  full, aux = model.apply({'params': params}, rows, method=CLIP.encode_text)
  short, aux_s = model.apply({'params': params}, rows, token_stride=8, differentiated=True,
                             method=CLIP.encode_text)
  np.testing.assert_allclose(short, full, atol=1e-6)
  np.testing.assert_allclose(aux_s['tokens'], aux['tokens'][::8], atol=1e-5)
  _, aux_0 = model.apply({'params': params}, rows, token_stride=0, method=CLIP.encode_text)
  assert aux_0['tokens'].shape[0] == 0


def test_cpu_workarounds_only_on_a_single_cpu_device():
  # conftest forces 8 host devices: the scan's collectives would deadlock there.
  assert jax.device_count() > 1 and not layers.cpu_stack_workarounds_here()


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_the_one_trip_copy_is_exact(dtype):
  x = jnp.asarray([[-0.0, 1.5, -jnp.inf], [jnp.nan, 3e-38, 7.0]], dtype)
  for value in (x, x[::-1]):   # NaN first: two trips
    out = jax.jit(layers._one_trip_copy)(value)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(value, np.float32))
    assert np.array_equal(np.signbit(np.asarray(out, np.float32)),
                          np.signbit(np.asarray(value, np.float32)))
  assert jax.jit(layers._one_trip_copy)(jnp.zeros((0, 3), dtype)).shape == (0, 3)
  g = jax.grad(lambda v: jnp.sum(jnp.sin(layers.store_cotangent(v))))(jnp.arange(4.0))
  np.testing.assert_allclose(g, np.cos(np.arange(4.0)), rtol=1e-6)


def _stack_backward_hlo(n_layers, workaround, monkeypatch):
  monkeypatch.setattr(layers, 'cpu_stack_workarounds_here', lambda: workaround)
  stack = layers.Transformer(n_layers, 2)
  x = jnp.ones((2, 9, 16))
  params = nn.Module.init(stack, jax.random.key(0), x)   # its ``init`` field shadows the method
  loss = lambda p, x: jnp.sum(jnp.sin(stack.apply(p, x, differentiated=True)))
  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()


def test_stored_cotangents_survive_compilation_and_keep_fusions_small(monkeypatch):
  n_layers = 12
  hlo = _stack_backward_hlo(n_layers, True, monkeypatch)
  assert len(re.findall(r' while\(', hlo)) == n_layers   # one per block boundary, none folded
  widest = lambda text: max(len(re.findall(r'%[\w.\-]+', m.group(1)))
                            for m in re.finditer(r' fusion\(([^)]*)\)', text))
  # Without them XLA:CPU fuses the running cotangent sum into every block: fusions read the
  # LayerNorm and projection gradients of all later blocks at once.
  plain = widest(_stack_backward_hlo(n_layers, False, monkeypatch))
  stored = widest(hlo)
  assert stored * 3 < plain, (stored, plain)
