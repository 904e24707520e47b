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
from typing import Any, Callable, Optional, Sequence

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
  softmax(q q^T s) + softmax(k k^T s), used for segmentation only. ``attention`` names the
  kernel (``attention.py``).
  """
  num_heads: int
  in_proj_std: Optional[float] = None   # None: xavier_uniform (torch default)
  out_proj_std: Optional[float] = None  # None: kaiming_uniform(a=√5) (torch default)
  dtype: Dtype = jnp.float32
  attention: str = 'xla'

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
      out = dot_product_attention(q, k, v, scale=scale, dtype=self.dtype, causal=causal,
                                  query_positions=query_positions,
                                  implementation=self.attention)
    out = out.reshape(out.shape[:2] + (d,))
    out_init = torch_linear_kernel if self.out_proj_std is None else normal(self.out_proj_std)
    return Linear(d, ('heads', 'embed'), out_init, nn.initializers.zeros, self.dtype,
                  name='out_proj')(out)


class Mlp(nn.Module):
  """``c_fc`` -> exact GELU -> ``c_proj``, the hidden width ``mlp_ratio`` times the input's."""
  mlp_ratio: float = 4.0
  fc_std: Optional[float] = None
  proj_std: Optional[float] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    fc_init = None if self.fc_std is None else normal(self.fc_std)
    proj_init = None if self.proj_std is None else normal(self.proj_std)
    x = Linear(int(d * self.mlp_ratio), ('embed', 'mlp'), fc_init, dtype=self.dtype,
               name='c_fc')(x)
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
  attention: str = 'xla'
  causal: bool = False

  def setup(self):
    self.ln_1 = LayerNorm()
    self.attn = MultiheadAttention(self.num_heads, self.init.attn_std, self.init.proj_std,
                                   self.dtype, self.attention)
    self.ln_2 = LayerNorm()
    self.mlp = Mlp(self.mlp_ratio, self.init.fc_std, self.init.proj_std, self.dtype)

  def __call__(self, x: jax.Array, csa: bool = False,
               query_index: Optional[jax.Array] = None) -> jax.Array:
    x = constrain(x, ('batch', 'length', 'embed'))
    h = self.ln_1(x)
    if query_index is None:
      x = x + self.attn(h, causal=self.causal, csa=csa)
    else:
      at = lambda t: jnp.take_along_axis(t, query_index[:, None, None], axis=1)
      x = at(x) + self.attn(at(h), h, causal=self.causal, query_positions=query_index[:, None])
    return x + self.mlp(self.ln_2(x))


class _ScannedBlock(ResidualAttentionBlock):
  """One step of ``nn.scan`` over the body: (carry, None) -> (carry, None)."""

  def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
    return ResidualAttentionBlock.__call__(self, x), None


class BlockStack:
  """How a tower runs its body (every block but the last): one block after another.

  A backend may pass its own form to the model (``CLIP.stack``; XLA:CPU's is in
  ``cosmos_jax/xla_cpu/stack.py``); every form gives the same values and gradients.
  ``template`` is an unbound block of the same configuration, for forms that apply the blocks'
  parameters themselves.
  """

  def __call__(self, blocks: Sequence[nn.Module], x: jax.Array, *, remat: bool,
               template: nn.Module) -> jax.Array:
    for block in blocks:
      x = block(x)
    return x


class Transformer(nn.Module):
  """``resblocks_{i}``: the body (blocks 0..L-2) and the last block, callable apart.

  The towers' training forwards read most rows at one position only (CLS or EOT), so they run
  ``body`` and then ``last`` with a ``query_index`` for those rows (``models/cosmos.py``).
  ``scan_layers``: the body is one ``nn.scan`` over stacked parameters ``resblocks``
  (leading axis L-1, logical name 'layers'), the last block stays ``resblocks_{L-1}``;
  ``models/stacking.py`` converts between the two layouts. ``remat``: every block is
  rematerialised. ``stack``: the body's form when not scanned (``BlockStack``).
  """
  layers: int
  num_heads: int
  mlp_ratio: float = 4.0
  init: BlockInit = BlockInit()
  dtype: Dtype = jnp.float32
  remat: bool = False
  causal: bool = False
  attention: str = 'xla'
  scan_layers: bool = False
  stack: Optional[BlockStack] = None

  def _block_kwargs(self) -> dict:
    return dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, init=self.init,
                dtype=self.dtype, attention=self.attention, causal=self.causal)

  def setup(self):
    # The body's blocks are called as block(x); the last one always with every argument
    # (``csa`` static under remat).
    body_cls = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    last_cls = (nn.remat(ResidualAttentionBlock, static_argnums=(2,)) if self.remat
                else ResidualAttentionBlock)
    n_body = self.layers - 1
    if self.scan_layers and n_body:
      step = nn.remat(_ScannedBlock, prevent_cse=False) if self.remat else _ScannedBlock
      self.resblocks = nn.scan(step, variable_axes={'params': 0}, split_rngs={'params': True},
                               length=n_body, metadata_params={nn.PARTITION_NAME: 'layers'}
                               )(**self._block_kwargs())
    else:
      self.resblocks = [body_cls(**self._block_kwargs()) for _ in range(n_body)]
    setattr(self, f'resblocks_{n_body}', last_cls(**self._block_kwargs()))

  def body(self, x: jax.Array) -> jax.Array:
    """x (B, L, D) through blocks 0..L-2."""
    if self.layers == 1:
      return x
    if self.scan_layers:
      return self.resblocks(x, None)[0]
    if self.stack is None or self.is_initializing():
      return BlockStack()(self.resblocks, x, remat=self.remat, template=None)
    template = ResidualAttentionBlock(**self._block_kwargs(), parent=None)
    return self.stack(self.resblocks, x, remat=self.remat, template=template)

  def last(self, x: jax.Array, *, csa: bool = False,
           query_index: Optional[jax.Array] = None) -> jax.Array:
    """The last block: (B, L, D), or (B, 1, D) at ``query_index`` (B,); ``csa``: SCLIP's."""
    return getattr(self, f'resblocks_{self.layers - 1}')(x, csa, query_index)

  def __call__(self, x: jax.Array, *, csa_last: bool = False) -> jax.Array:
    return self.last(self.body(x), csa=csa_last)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), as torch.nn.functional.normalize."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  # Guarded sqrt: a plain one gives NaN gradients for a zero vector; torch's norm backward
  # gives 0 there, leaving d/dx = 1/eps as here.
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)
  return x / jnp.maximum(norm, eps)
