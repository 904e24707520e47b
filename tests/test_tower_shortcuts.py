"""The towers' training shortcuts change nothing: the scanned block stack and the last block
computed only where it is read (``token_stride``) give the plain unrolled forward's values
and gradients, for the student and the teacher."""

import dataclasses

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
  """Turns both shortcuts off: full last blocks (tokens then strided) and no scan."""
  from cosmos_jax.models import text, vision
  orig_v, orig_t = vision.VisionTransformer.__call__, text.TextTransformer.__call__

  def strided(aux, s):
    return aux if s is None else dict(aux, tokens=aux['tokens'][::s] if s else aux['tokens'][:0])

  def v_call(self, x, *, csa=False, token_stride=None, scan=False):
    pooled, aux = orig_v(self, x, csa=csa)
    return pooled, strided(aux, token_stride)

  def t_call(self, x, *, token_stride=None, scan=False):
    pooled, aux = orig_t(self, x)
    return pooled, strided(aux, token_stride)

  monkeypatch.setattr(vision.VisionTransformer, '__call__', v_call)
  monkeypatch.setattr(text.TextTransformer, '__call__', t_call)


@pytest.mark.parametrize('n_layers,remat', [(2, False), (layers.SCAN_MIN_LAYERS + 2, False),
                                            (layers.SCAN_MIN_LAYERS + 2, True)])
def test_student_and_teacher_match_the_plain_forward(n_layers, remat, monkeypatch):
  monkeypatch.setattr(layers, 'scan_blocks_here', lambda: True)   # tests run 8 host devices
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
  monkeypatch.setattr(layers, 'scan_blocks_here', lambda: True)
  cfg = deep_tiny(layers.SCAN_MIN_LAYERS + 2)
  model = CLIP(cfg)
  params = models.init_params(cfg, jax.random.key(0))
  _, _, t = batch()
  rows = t.reshape(-1, 77)
  full, aux = model.apply({'params': params}, rows, method=CLIP.encode_text)
  short, aux_s = model.apply({'params': params}, rows, token_stride=8, scan=True,
                             method=CLIP.encode_text)
  np.testing.assert_allclose(short, full, atol=1e-6)
  np.testing.assert_allclose(aux_s['tokens'], aux['tokens'][::8], atol=1e-5)
  _, aux_0 = model.apply({'params': params}, rows, token_stride=0, method=CLIP.encode_text)
  assert aux_0['tokens'].shape[0] == 0


def test_scan_only_on_a_single_cpu_device():
  # conftest forces 8 host devices: collectives inside the loop would deadlock there.
  assert jax.device_count() > 1 and not layers.scan_blocks_here()
