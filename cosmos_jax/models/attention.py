"""Scaled dot-product attention, one function with three kernels chosen by ``model.attention``.

Every kernel computes softmax(q k^T * scale + mask) v with float32 logits, softmax and
accumulation (the products' operands in the model's dtype):
  * ``xla``: ``jax.nn.dot_product_attention`` lowered by XLA; the portable form (TPU, and
    GPU in float32);
  * ``cudnn``: the same call with cuDNN's fused kernel (GPU, bf16/fp16 only). Its limits
    (head dim a multiple of 8 up to 128; an explicit mask needs even sequence lengths, which
    197 image tokens and 77 text positions are not) are met by passing no mask: the ViT needs
    none and the text tower's mask is ``is_causal``. The one call that needs an explicit mask
    (the text tower's pooled-only last block, queries at the EOT positions) takes ``xla``;
  * ``cpu_custom``: heads-major operands and a hand-written backward for XLA:CPU, where a text
    tower's many 77x77 products and softmax passes are most of the step. The softmax's
    normalisation is deferred to the (Q, C) output, o = (e v) / sum(e) with
    e = exp(logits - max), which saves a full (Q, K) pass forward and, through the identity
    sum_k p dp = sum_c o do, another one backward. Only the order of rounding differs.
``resolve`` turns ``auto`` into one of them for a platform.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla', 'cudnn', 'cpu_custom')
MASKED = float(jnp.finfo(jnp.float32).min)


def resolve(name: str, platform: str, dtype: Any) -> str:
  """The kernel for ``model.attention=name`` on ``platform`` ('cpu', 'gpu'/'cuda', 'tpu')."""
  if name != 'auto':
    if name not in IMPLEMENTATIONS:
      raise ValueError(f'unknown attention implementation {name!r}; known: auto, '
                       f'{", ".join(IMPLEMENTATIONS)}')
    if name == 'cudnn' and platform not in ('gpu', 'cuda'):
      raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU; the mesh is on {platform}")
    if name == 'cudnn' and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      raise ValueError("model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN's fused "
                       'attention has no float32 kernel)')
    return name
  if platform == 'cpu':
    return 'cpu_custom'
  if platform in ('gpu', 'cuda') and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, dtype: Any,
                          causal: bool = False, query_positions: Optional[jax.Array] = None,
                          implementation: str = 'xla') -> jax.Array:
  """q (B, Q, H, C), k and v (B, K, H, C); returns (B, Q, H, C) in ``dtype``.

  ``causal``: query p sees keys 0..p, where p is the query's position: 0..Q-1, or
  ``query_positions`` (B, Q) when the queries are a subset of the key positions.
  """
  q, k, v = (t.astype(dtype) for t in (q, k, v))
  mask = None
  if causal and query_positions is not None:
    mask = (jnp.arange(k.shape[1]) <= query_positions[..., None])[:, None]   # (B, 1, Q, K)
  if implementation == 'cpu_custom':
    if causal and mask is None:
      mask = (jnp.arange(k.shape[1]) <= jnp.arange(q.shape[1])[:, None])[None, None]
    return _custom_attention(q, k, v, mask, scale)
  if implementation not in ('xla', 'cudnn'):
    raise ValueError(f'unknown attention implementation {implementation!r}')
  if mask is not None:   # an explicit mask: cuDNN would need even sequence lengths
    implementation = 'xla'
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                      is_causal=causal and mask is None,
                                      implementation=implementation).astype(dtype)


def _custom_attention(q, k, v, mask, scale):
  heads_major = lambda t: jnp.swapaxes(t, 1, 2)
  bias = None if mask is None else jnp.where(mask, 0.0, MASKED).astype(jnp.float32)
  out = _attend(heads_major(q), heads_major(k), heads_major(v), bias, scale)
  return jnp.swapaxes(out, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, bias, scale):
  return _attend_fwd(q, k, v, bias, scale)[0]


def _attend_fwd(q, k, v, bias, scale):
  logits = jnp.einsum('bhqc,bhkc->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  inv_sum = 1 / jnp.sum(e, axis=-1, keepdims=True)
  out = jnp.einsum('bhqk,bhkc->bhqc', e.astype(q.dtype), v, preferred_element_type=jnp.float32)
  out = (out * inv_sum).astype(q.dtype)
  return out, (q, k, v, e, inv_sum, out)


def _attend_bwd(scale, residuals, d_out):
  # With p = e * inv_sum: dv = p^T do, dp = do v^T, dlogits = p (dp - sum_k p dp), and
  # sum_k p dp = sum_c o do. Scaling do's rows by inv_sum first keeps every (Q, K) array
  # in terms of e.
  q, k, v, e, inv_sum, out = residuals
  d_out_scaled = (d_out * inv_sum).astype(q.dtype)
  dv = jnp.einsum('bhqk,bhqc->bhkc', e.astype(q.dtype), d_out_scaled)
  dp_scaled = jnp.einsum('bhqc,bhkc->bhqk', d_out_scaled, v, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (e * (dp_scaled - row_dot * inv_sum) * scale).astype(q.dtype)
  dq = jnp.einsum('bhqk,bhkc->bhqc', d_logits, k)
  dk = jnp.einsum('bhqk,bhqc->bhkc', d_logits, q)
  return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)
