"""The hand-written attention against the textbook formula: values (NumPy, float64) and
gradients (JAX's autodiff of the plain softmax form)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.models.attention import dot_product_attention

B, L, H, C = 3, 7, 2, 4
SCALE = C ** -0.5


def causal_mask(q_len, k_len):
  return (np.arange(k_len)[None, :] <= np.arange(q_len)[:, None])[None, None]


def numpy_attention(q, k, v, mask):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum('bqhc,bkhc->bhqk', q, k) * SCALE
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhc->bqhc', p, v)


def plain_attention(q, k, v, mask):
  logits = jnp.einsum('bqhc,bkhc->bhqk', q, k) * SCALE
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  return jnp.einsum('bhqk,bkhc->bqhc', jax.nn.softmax(logits, axis=-1), v)


def inputs(q_len, k_len, seed=0):
  rng = np.random.default_rng(seed)
  draw = lambda n: jnp.asarray(rng.standard_normal((B, n, H, C)) * 2, jnp.float32)
  return draw(q_len), draw(k_len), draw(k_len)


# (query length, key length, mask): self-attention, causal self-attention, one query per row
# at its own position (the pooled text rows), cross-attention.
CASES = {
    'full': (L, L, None),
    'causal': (L, L, causal_mask(L, L)),
    'one_query': (1, L, (np.arange(L) <= np.array([0, 3, 6])[:, None])[:, None, None]),
    'cross': (3, L, None),
}


@pytest.mark.parametrize('case', CASES)
def test_values_match_the_formula(case):
  q_len, k_len, mask = CASES[case]
  q, k, v = inputs(q_len, k_len)
  got = dot_product_attention(q, k, v, mask, SCALE, jnp.float32)
  np.testing.assert_allclose(got, numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', CASES)
def test_gradients_match_autodiff_of_the_formula(case):
  q_len, k_len, mask = CASES[case]
  q, k, v = inputs(q_len, k_len)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, q_len, H, C)), jnp.float32)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * weights)
  ours = jax.grad(loss(lambda *a: dot_product_attention(*a, mask, SCALE, jnp.float32)),
                  argnums=(0, 1, 2))(q, k, v)
  plain = jax.grad(loss(lambda *a: plain_attention(*a, mask)), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip('qkv', ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f'd{name}')


def test_bfloat16_operands_stay_close_and_return_bfloat16():
  q, k, v = inputs(L, L)
  mask = causal_mask(L, L)
  got = dot_product_attention(q, k, v, mask, SCALE, jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), numpy_attention(q, k, v, mask),
                             atol=0.1, rtol=0.05)
