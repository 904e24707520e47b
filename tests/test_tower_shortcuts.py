"""The towers' training forms change nothing. The last block computed only where it is read
(``models/cosmos.py``), the XLA:CPU body (stored cotangents between blocks; the scanned stack
with remat), the scanned layers (``model.scan_layers``) and each attention kernel that runs on
CPU give the plain unrolled forward's values and gradients, for the student and the teacher."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax import models
from cosmos_jax.models import CLIP, cosmos
from cosmos_jax.xla_cpu.stack import CpuBlockStack

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


def every_position(transformer, x, pool_index, full_stride):
  """The reference for ``_last_block_where_read``: every row through every block in full."""
  full = transformer(x)
  pooled = jnp.take_along_axis(full, pool_index[:, None, None], axis=1)[:, 0]
  return (full[::full_stride] if full_stride else full[:0]), pooled


def student_and_teacher(model, params, inputs):
  g, l, t = inputs

  def run(p):
    s = model.apply({'params': p}, g, l, t, method=CLIP.student)
    te = model.clone(stack=None).apply({'params': p}, g, t, method=CLIP.teacher)
    loss = sum(jnp.sum(jnp.sin(3 * x)) for x in jax.tree.leaves((s, te)))
    return loss, (s, te)

  # Jitted: op by op, the scans, remat and custom VJPs take minutes per case.
  return jax.jit(jax.value_and_grad(run, has_aux=True))(params)


FORMS = {   # name: CLIP keyword arguments
    'last_block_where_read': {},
    'cpu_stack': {'stack': CpuBlockStack()},
    'scan_layers': {'scan_layers': True},
    'cpu_custom_attention': {'attention': 'cpu_custom', 'stack': CpuBlockStack()},
}


_REFERENCE = {}


def plain_forward(n_layers, params, monkeypatch):
  """The plain unrolled model's outputs and gradients, once per depth (remat changes none;
  ``params`` are the same for a depth in every case: the same keys)."""
  if n_layers not in _REFERENCE:
    with monkeypatch.context() as m:
      m.setattr(cosmos, '_last_block_where_read', every_position)
      _REFERENCE[n_layers] = student_and_teacher(CLIP(deep_tiny(n_layers)), params, batch())
  return _REFERENCE[n_layers]


# (form, depth, remat): depth 2 is a body of one block (the last, computed where read); remat
# goes through each form's own path (nn.remat per block, the stack's remat of its scanned body,
# the scan's remat); the stack without remat runs with the CPU attention kernel, and one depth
# is enough for that kernel (tests/test_attention.py has the rest). Each case compiles the
# student and the teacher with their gradients (30-70 s on 2 cores), so no case repeats a path.
CASES = [('last_block_where_read', 2, False), ('last_block_where_read', 4, True),
         ('cpu_stack', 4, True), ('scan_layers', 4, True), ('cpu_custom_attention', 4, False)]


@pytest.mark.parametrize('form,n_layers,remat', CASES)
def test_student_and_teacher_match_the_plain_forward(n_layers, remat, form, monkeypatch):
  cfg = deep_tiny(n_layers)
  params = models.init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
  kwargs = FORMS[form]
  scanned = kwargs.get('scan_layers', False)
  (_, out), grads = student_and_teacher(CLIP(cfg, remat=remat, **kwargs),
                                        models.stack_layers(params) if scanned else params,
                                        batch())
  if scanned:
    assert models.is_stacked(grads)
    grads = models.unstack_layers(grads)
  (_, ref_out), ref_grads = plain_forward(n_layers, params, monkeypatch)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref_grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale)


def test_text_views_return_the_tokens_of_view_zero():
  cfg = deep_tiny(4)
  model = CLIP(cfg)
  params = models.init_params(cfg, jax.random.key(0))
  _, _, t = batch()
  rows = t.reshape(-1, 77)
  full, aux = model.apply({'params': params}, rows, normalize=False, method=CLIP.encode_text)
  pooled, tokens = model.apply({'params': params}, rows, 8, method=CLIP.text_views)
  np.testing.assert_allclose(pooled, full, atol=1e-5)
  np.testing.assert_allclose(tokens, aux['tokens'][::8], atol=1e-5)
  _, none = model.apply({'params': params}, rows, 0, method=CLIP.text_views)
  assert none.shape[0] == 0


def test_stacking_round_trips_and_matches_the_scanned_models_own_layout():
  cfg = deep_tiny(4)
  params = models.init_params(cfg, jax.random.key(0))
  stacked = models.stack_layers(params)
  body = stacked['visual']['transformer']
  assert sorted(body) == ['resblocks', 'resblocks_3']
  assert body['resblocks']['attn']['in_proj_weight'].shape[0] == 3
  scanned_shapes = jax.eval_shape(
      lambda: models.init_boxed_params(cfg, jax.random.key(0), scan_layers=True))
  from flax import linen as nn
  assert (jax.tree.map(lambda x: x.shape, nn.unbox(scanned_shapes))
          == jax.tree.map(lambda x: x.shape, stacked))
  jax.tree.map(np.testing.assert_array_equal, models.unstack_layers(stacked), params)
  assert models.unstack_layers(params) is not None and not models.is_stacked(params)
  jax.tree.map(np.testing.assert_array_equal, models.init_params(cfg, jax.random.key(0), True),
               stacked)
