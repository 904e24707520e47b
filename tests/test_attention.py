"""Every attention kernel that runs on CPU ('xla', 'cpu_custom') against the textbook formula:
values (NumPy, float64) and gradients (JAX's autodiff of the plain softmax form); and the
choice of kernel per backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.models import attention
from cosmos_jax.models.attention import dot_product_attention

B, L, H, C = 3, 7, 2, 4
SCALE = C ** -0.5
CPU_KERNELS = ('xla', 'cpu_custom')


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


ONE_QUERY_POSITIONS = np.array([[0], [3], [6]])
# name: (query length, key length, keyword arguments, the mask they mean): self-attention,
# causal self-attention, one query per row at its own position (the pooled text rows),
# cross-attention.
CASES = {
    'full': (L, L, {}, None),
    'causal': (L, L, {'causal': True},
               (np.arange(L)[None, :] <= np.arange(L)[:, None])[None, None]),
    'one_query': (1, L, {'causal': True, 'query_positions': jnp.asarray(ONE_QUERY_POSITIONS)},
                  (np.arange(L) <= ONE_QUERY_POSITIONS[..., None])[:, None]),
    'cross': (3, L, {}, None),
}


@pytest.mark.parametrize('kernel', CPU_KERNELS)
@pytest.mark.parametrize('case', CASES)
def test_values_match_the_formula(case, kernel):
  q_len, k_len, kwargs, mask = CASES[case]
  q, k, v = inputs(q_len, k_len)
  got = dot_product_attention(q, k, v, scale=SCALE, dtype=jnp.float32, implementation=kernel,
                              **kwargs)
  np.testing.assert_allclose(got, numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel', CPU_KERNELS)
@pytest.mark.parametrize('case', CASES)
def test_gradients_match_autodiff_of_the_formula(case, kernel):
  q_len, k_len, kwargs, mask = CASES[case]
  q, k, v = inputs(q_len, k_len)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, q_len, H, C)), jnp.float32)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * weights)
  ours = jax.grad(loss(lambda *a: dot_product_attention(
      *a, scale=SCALE, dtype=jnp.float32, implementation=kernel, **kwargs)),
                  argnums=(0, 1, 2))(q, k, v)
  plain = jax.grad(loss(lambda *a: plain_attention(*a, mask)), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip('qkv', ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f'd{name}')


@pytest.mark.parametrize('kernel', CPU_KERNELS)
def test_bfloat16_operands_stay_close_and_return_bfloat16(kernel):
  q, k, v = inputs(L, L)
  got = dot_product_attention(q, k, v, scale=SCALE, dtype=jnp.bfloat16, causal=True,
                              implementation=kernel)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), numpy_attention(q, k, v, CASES['causal'][3]),
                             atol=0.1, rtol=0.05)


def test_auto_picks_the_kernel_of_each_backend():
  assert attention.resolve('auto', 'cpu', jnp.float32) == 'cpu_custom'
  assert attention.resolve('auto', 'gpu', jnp.bfloat16) == 'cudnn'
  assert attention.resolve('auto', 'gpu', jnp.float32) == 'xla'   # cuDNN has no fp32 kernel
  assert attention.resolve('auto', 'tpu', jnp.bfloat16) == 'xla'
  assert attention.resolve('xla', 'cpu', jnp.float32) == 'xla'
  with pytest.raises(ValueError, match='needs an NVIDIA GPU'):
    attention.resolve('cudnn', 'tpu', jnp.bfloat16)
  with pytest.raises(ValueError, match="model.dtype='bfloat16'"):
    attention.resolve('cudnn', 'gpu', jnp.float32)
  with pytest.raises(ValueError, match='unknown attention'):
    attention.resolve('flash', 'gpu', jnp.bfloat16)
