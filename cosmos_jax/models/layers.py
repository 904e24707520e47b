"""Transformer pieces named and laid out like open_clip's PyTorch modules.

Numerics that must match the reference live here, once:
  * LayerNorm eps 1e-5 (torch default; Flax's is 1e-6), computed in float32;
  * exact (erf) GELU, not the tanh approximation, in torch's form 0.5 x (1 + erf(x / sqrt 2));
  * attention softmax in float32 (``attention.py``);
  * packed torch-layout ``in_proj_weight`` (3D, D).
Matmuls run in ``dtype`` (float32 or bfloat16); parameters are always float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.models.attention import dot_product_attention

LN_EPS = 1e-5
Dtype = Any
Initializer = Callable[..., jax.Array]


def gelu(x: jax.Array) -> jax.Array:
  # torch's formula. jax.nn.gelu(approximate=False) goes through erfc, which XLA:CPU builds
  # from exp and is about twice as slow; the two agree to float rounding.
  return 0.5 * x * (1 + jax.lax.erf(x * np.float32(math.sqrt(0.5))))


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., D) @ kernel (D, F) as one 2D product over the flattened leading axes.

  With the leading axes kept, the backward's kernel gradient contracts two axes at once, and
  XLA:CPU then transposes the whole output gradient before the product (ViT-B/16: ~4% of the
  train step, tiny: ~8%). Flattened, it is a plain (D, N) x (N, F) product.
  """
  lead = x.shape[:-1]
  return jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(lead + kernel.shape[-1:])


def logical(init: Initializer, names: tuple[Optional[str], ...]) -> Initializer:
  """Attaches logical axis names (mapped to mesh axes by the config's rules table)."""
  return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[Optional[str], ...]) -> jax.Array:
  return nn.with_logical_constraint(x, names)


# PyTorch's default initialisers, for modules the reference leaves at their defaults.
torch_linear_kernel = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')  # kaiming(a=√5)
xavier_uniform = nn.initializers.xavier_uniform()


def torch_linear_bias(fan_in: int) -> Initializer:
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def normal(std: float) -> Initializer:
  return nn.initializers.normal(stddev=std)


@dataclasses.dataclass(frozen=True)
class BlockInit:
  """Weight stds of one residual block; ``None`` keeps PyTorch's module defaults (the ViT)."""
  attn_std: Optional[float] = None
  proj_std: Optional[float] = None
  fc_std: Optional[float] = None

  @classmethod
  def text_tower(cls, width: int, layers: int) -> 'BlockInit':
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    return cls(attn_std=width ** -0.5, proj_std=proj_std, fc_std=(2 * width) ** -0.5)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm: eps 1e-5, biased variance, float32 math, output in the input dtype."""
  epsilon: float = LN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param('scale', logical(nn.initializers.ones, ('norm',)), (d,), jnp.float32)
    bias = self.param('bias', logical(nn.initializers.zeros, ('norm',)), (d,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


class Linear(nn.Module):
  """torch.nn.Linear with a Flax (in, out) kernel; init defaults to PyTorch's."""
  features: int
  kernel_axes: tuple[Optional[str], str] = ('embed', 'mlp')
  kernel_init: Optional[Initializer] = None
  bias_init: Optional[Initializer] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param('kernel', logical(self.kernel_init or torch_linear_kernel, self.kernel_axes),
                        (fan_in, self.features), jnp.float32)
    bias = self.param('bias', logical(self.bias_init or torch_linear_bias(fan_in),
                                      (self.kernel_axes[1],)), (self.features,), jnp.float32)
    y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch first) with the packed ``in_proj_weight`` (3D, D).

  ``kv`` given: cross-attention (queries from ``x``, keys/values from ``kv``), as
  ``nn.MultiheadAttention(d, h, kdim=d, vdim=d)`` does. ``causal``: query at position p sees
  keys 0..p; ``query_positions`` (B, Q) gives those positions when the queries are a subset
  of the key positions (default 0..Q-1). ``csa=True``: SCLIP's correlative self-attention,
  softmax(q q^T s) + softmax(k k^T s), used for segmentation only.
  """
  num_heads: int
  in_proj_std: Optional[float] = None   # None: xavier_uniform (torch default)
  out_proj_std: Optional[float] = None  # None: kaiming_uniform(a=√5) (torch default)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv: Optional[jax.Array] = None, *, causal: bool = False,
               csa: bool = False, query_positions: Optional[jax.Array] = None) -> jax.Array:
    d = x.shape[-1]
    h = self.num_heads
    if d % h:
      raise ValueError(f'attention width {d} is not divisible by {h} heads')
    w_init = xavier_uniform if self.in_proj_std is None else normal(self.in_proj_std)
    w = self.param('in_proj_weight', logical(w_init, ('qkv', 'embed')), (3 * d, d), jnp.float32)
    b = self.param('in_proj_bias', logical(nn.initializers.zeros, ('qkv',)), (3 * d,), jnp.float32)
    w, b = w.astype(self.dtype), b.astype(self.dtype)
    x = x.astype(self.dtype)
    if kv is None:
      q, k, v = jnp.split(matmul(x, w.T) + b, 3, axis=-1)
    else:
      kv = kv.astype(self.dtype)
      q = matmul(x, w[:d].T) + b[:d]
      k, v = jnp.split(matmul(kv, w[d:].T) + b[d:], 2, axis=-1)
    split = lambda t: t.reshape(t.shape[:2] + (h, d // h))
    q, k, v = split(q), split(k), split(v)
    scale = (d // h) ** -0.5

    if csa:  # segmentation only, never differentiated: the plain form
      softmax = lambda a, b_: jax.nn.softmax(
          jnp.einsum('bqhc,bkhc->bhqk', a, b_, preferred_element_type=jnp.float32) * scale)
      probs = softmax(q, q) + softmax(k, k)
      out = jnp.einsum('bhqk,bkhc->bqhc', probs.astype(self.dtype), v)
    else:
      mask = None
      if causal:
        if query_positions is None:
          query_positions = jnp.arange(q.shape[1])[None]
        mask = (jnp.arange(k.shape[1]) <= query_positions[..., None])[:, None]
      out = dot_product_attention(q, k, v, mask, scale, self.dtype)
    out = out.reshape(out.shape[:2] + (d,))
    out_init = torch_linear_kernel if self.out_proj_std is None else normal(self.out_proj_std)
    return Linear(d, ('heads', 'embed'), out_init, nn.initializers.zeros, self.dtype,
                  name='out_proj')(out)


class Mlp(nn.Module):
  """``c_fc`` -> exact GELU -> ``c_proj``."""
  hidden: int
  fc_std: Optional[float] = None
  proj_std: Optional[float] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    fc_init = None if self.fc_std is None else normal(self.fc_std)
    proj_init = None if self.proj_std is None else normal(self.proj_std)
    x = Linear(self.hidden, ('embed', 'mlp'), fc_init, dtype=self.dtype, name='c_fc')(x)
    x = constrain(gelu(x), ('batch', 'length', 'mlp'))
    return Linear(d, ('mlp', 'embed'), proj_init, dtype=self.dtype, name='c_proj')(x)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

  ``query_index`` (B,): compute the output only at that position of each row (keys and values
  still cover every position); returns (B, 1, D), equal to the full block's row at the index.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  init: BlockInit = BlockInit()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool = False, csa: bool = False,
               query_index: Optional[jax.Array] = None) -> jax.Array:
    d = x.shape[-1]
    x = constrain(x, ('batch', 'length', 'embed'))
    attn = MultiheadAttention(self.num_heads, self.init.attn_std, self.init.proj_std, self.dtype,
                              name='attn')
    h = LayerNorm(name='ln_1')(x)
    if query_index is None:
      x = x + attn(h, causal=causal, csa=csa)
    else:
      at = lambda t: jnp.take_along_axis(t, query_index[:, None, None], axis=1)
      x = at(x) + attn(at(h), h, causal=causal, query_positions=query_index[:, None])
    mlp = Mlp(int(d * self.mlp_ratio), self.init.fc_std, self.init.proj_std, self.dtype, name='mlp')
    return x + mlp(LayerNorm(name='ln_2')(x))


# XLA:CPU and deep differentiated stacks. Left alone, the backward's residual-stream cotangent
# (a running sum over every later block's LayerNorm and input-projection gradients) is fused,
# not stored, into each block's consumers: work quadratic in depth (ViT-B/16: ~25% of the
# step). On one CPU device the differentiated forwards (``differentiated=True``, the student)
# therefore store that cotangent between blocks; with ``remat`` they run the blocks as a
# lax.scan instead, the one form in which XLA:CPU keeps remat's recomputation (unrolled, it
# merges it with the forward again and nothing is saved). Forward-only passes gain nothing.


def cpu_stack_workarounds_here() -> bool:
  """Only on a single CPU device: the fusion problem is XLA:CPU's. On several host devices the
  scan's collectives starve the thread pool the devices share (deadlock), and the stored
  cotangent's trip count (its first element) would take a collective of its own."""
  return jax.default_backend() == 'cpu' and jax.device_count() == 1


def _one_trip_copy(x: jax.Array) -> jax.Array:
  """x, passed through a while loop of one trip that XLA cannot count at compile time.

  A loop's operands and results are whole buffers, so nothing is fused across it: the fusion
  barrier XLA:CPU honours (it expands ``optimization_barrier`` before fusing). The trip count
  is 2 when x's first element is NaN, with the same result.
  """
  if not x.size:
    return x
  trips = 1 + jnp.isnan(x.reshape(-1)[0]).astype(jnp.int32)

  def body(carry):
    i, y = carry
    # A float product by a loop-dependent 1: XLA cannot fold it, so y is not loop-invariant
    # (an invariant carry would be forwarded past the loop, barrier and all).
    return i + 1, y * (1 + 0 * i.astype(y.dtype))

  return jax.lax.while_loop(lambda carry: carry[0] < trips, body, (jnp.int32(0), x))[1]


@jax.custom_vjp
def store_cotangent(x: jax.Array) -> jax.Array:
  """Identity whose backward stores the cotangent whole (``_one_trip_copy``)."""
  return x


store_cotangent.defvjp(lambda x: (x, None), lambda _, g: (_one_trip_copy(g),))


class Transformer(nn.Module):
  """``resblocks_{i}``; ``csa_last`` swaps the last block's attention for CSA (residual, MLP kept).

  ``pool_index`` (N,) with ``token_stride`` s, for the training forwards, where most rows are
  only read at one position (CLS or EOT): rows 0, s, 2s, ... (view 0 of each sample, rows
  being sample-major with s views) need every position, the others only ``pool_index``
  (s = 0: no row needs every position). The last block then computes the other rows at that
  position only. Returns (the N/s full rows (or none) after all blocks, the (N, D) states at
  ``pool_index``) instead of x.
  """
  layers: int
  num_heads: int
  mlp_ratio: float = 4.0
  init: BlockInit = BlockInit()
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, causal: bool = False, csa_last: bool = False,
               pool_index: Optional[jax.Array] = None, token_stride: int = 0,
               differentiated: bool = False):
    block_cls = nn.remat(ResidualAttentionBlock, static_argnums=(2, 3)) if self.remat \
        else ResidualAttentionBlock
    blocks = [block_cls(self.num_heads, self.mlp_ratio, self.init, self.dtype,
                        name=f'resblocks_{i}') for i in range(self.layers)]
    n_body = self.layers - 1
    workaround = (differentiated and not self.is_initializing()
                  and cpu_stack_workarounds_here())
    if workaround and self.remat and n_body > 1:
      x = self._scan(blocks[:n_body], x, causal)
    else:
      keep = store_cotangent if workaround else (lambda t: t)
      for block in blocks[:n_body]:
        x = block(keep(x), causal, False)
      x = keep(x)
    last = blocks[-1]
    if pool_index is None:
      return last(x, causal, csa_last)
    if not token_stride:
      return x[:0], last(x, causal, False, pool_index)[:, 0]
    grouped = lambda t: t.reshape((-1, token_stride) + t.shape[1:])
    full = last(grouped(x)[:, 0], causal, csa_last)
    pooled = jnp.take_along_axis(full, grouped(pool_index)[:, 0, None, None], axis=1)
    if token_stride > 1:
      rest = grouped(x)[:, 1:].reshape((-1,) + x.shape[1:])
      rest_index = grouped(pool_index)[:, 1:].reshape(-1)
      rest = last(rest, causal, False, rest_index).reshape((-1, token_stride - 1, x.shape[-1]))
      pooled = jnp.concatenate([pooled, rest], axis=1)
    return full, pooled.reshape((-1, x.shape[-1]))

  def _scan(self, blocks: list, x: jax.Array, causal: bool) -> jax.Array:
    template = ResidualAttentionBlock(self.num_heads, self.mlp_ratio, self.init, self.dtype,
                                      parent=None)
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *[b.variables['params'] for b in blocks])

    def body(x, params):
      return template.apply({'params': params}, x, causal), None

    x, _ = jax.lax.scan(jax.checkpoint(body), x, stacked)
    return x


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), as torch.nn.functional.normalize."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  # Guarded sqrt: a plain one gives NaN gradients for a zero vector; torch's norm backward
  # gives 0 there, leaving d/dx = 1/eps as here.
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)
  return x / jnp.maximum(norm, eps)
