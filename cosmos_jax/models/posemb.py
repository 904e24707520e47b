"""Positional-embedding resize for local crops, matching the official PyTorch code.

The reference (DINO-style `interpolate_pos_encoding`) calls
`F.interpolate(grid, scale_factor=((gh + 0.1) / s, (gw + 0.1) / s), mode='bicubic',
align_corners=False)`. `jax.image.resize` cannot reproduce it: it derives the
coordinate map from the sizes (14/6, not 14/6.1), uses the A=-0.5 cubic and
antialiases when downsampling. Here the torch resampling is written out as two
small matrices built from the static shapes, so the resize is differentiable
and costs two tiny einsums under jit. In float64 it equals torch to ~1e-15; in
float32 it uses torch's float32 source coordinates and differs from torch only
by float32 rounding (a few 1e-6 for N(0, 1) inputs, as torch does from itself
in float64).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75  # torch's bicubic (Keys) coefficient.


def _cubic_near(x: np.ndarray) -> np.ndarray:
  """Keys kernel for |x| <= 1."""
  return ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1.0


def _cubic_far(x: np.ndarray) -> np.ndarray:
  """Keys kernel for 1 < |x| < 2."""
  return ((_A * x - 5.0 * _A) * x + 8.0 * _A) * x - 4.0 * _A


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, scale: float, *,
                   coord_dtype: type = np.float64) -> np.ndarray:
  """(out_size, in_size) matrix of torch bicubic, align_corners=False, given scale.

  Row o holds the weights of output o: source coordinate (o + 0.5) / scale - 0.5,
  four Keys taps (A=-0.75) with out-of-range taps clamped to the border.
  `coord_dtype` is the precision ATen computes the coordinate in: float32 for
  float32/bfloat16/float16 tensors, float64 for float64 ones. The kernel itself
  is evaluated in float64. The result is cached and read-only.
  """
  if in_size < 1 or out_size < 1 or not scale > 0:
    raise ValueError(
        f'bicubic_matrix needs positive sizes and scale, got in_size={in_size}, '
        f'out_size={out_size}, scale={scale}.')
  ct = np.dtype(coord_dtype).type
  # Same operations as ATen: compute_scales_value, area_pixel_compute_source_index
  # (cubic), guard_index_and_lambda, get_cubic_upsample_coefficients.
  src = ct(1.0 / scale) * (np.arange(out_size).astype(ct) + ct(0.5)) - ct(0.5)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - i0.astype(ct), ct(0), ct(1))
  x2 = (1.0 - t).astype(ct)
  args = [(t + 1.0).astype(ct), t, x2, (x2 + 1.0).astype(ct)]
  x = [a.astype(np.float64) for a in args]
  weights = np.stack(
      [_cubic_far(x[0]), _cubic_near(x[1]), _cubic_near(x[2]),
       _cubic_far(x[3])], axis=1)
  taps = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.repeat(np.arange(out_size), 4), taps.ravel()),
            weights.ravel())
  m.setflags(write=False)
  return m


def _side(num_patches: int) -> int:
  side = math.isqrt(num_patches)
  if side * side != num_patches or side == 0:
    raise ValueError(
        f'resize_pos_embed needs a square patch grid, but the embedding has '
        f'{num_patches} patch positions (plus the class token).')
  return side


def _out_size(side: int, target: int) -> tuple[int, float]:
  """Output size and scale exactly as the reference call computes them."""
  scale = (target + 0.1) / side
  return int(side * scale), scale  # ATen truncates the double product.


@functools.lru_cache(maxsize=64)
def _resize_matrices(side: int, gh: int, gw: int,
                     coord_dtype: type) -> tuple[np.ndarray, np.ndarray]:
  mats = []
  for target in (gh, gw):
    out, scale = _out_size(side, target)
    if out != target:
      raise ValueError(
          f'Grid size {target} is not reachable from a {side}x{side} grid with '
          f'scale_factor ({target} + 0.1) / {side} (it gives {out}).')
    mats.append(bicubic_matrix(side, target, scale, coord_dtype=coord_dtype))
  return tuple(mats)


def resize_pos_embed(pos_embed: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Resizes a (1 + N, D) positional embedding to (1 + gh * gw, D).

  Row 0 is the class position and is kept; rows 1.. are a square sqrt(N) grid
  in row-major order. `grid` = (gh, gw) follows the (height, width) order of the
  reference's `scale_factor`. When the grid is unchanged the input is returned
  as is, like the reference.
  """
  if pos_embed.ndim != 2:
    raise ValueError(
        f'resize_pos_embed expects a (1 + N, D) array, got shape '
        f'{pos_embed.shape}.')
  try:
    gh, gw = (int(g) for g in grid)
  except (TypeError, ValueError) as e:
    raise ValueError(f'grid must be two ints (gh, gw), got {grid!r}.') from e
  if gh != grid[0] or gw != grid[1] or gh < 1 or gw < 1:
    raise ValueError(f'grid must be two positive ints, got {grid!r}.')
  num_patches, dim = pos_embed.shape[0] - 1, pos_embed.shape[1]
  side = _side(num_patches)
  if gh * gw == num_patches and gh == gw:
    return pos_embed
  # ATen's opmath: float32 coordinates unless the tensor is float64.
  coord_dtype = np.float64 if pos_embed.dtype == jnp.float64 else np.float32
  mh, mw = _resize_matrices(side, gh, gw, coord_dtype)
  patches = pos_embed[1:].reshape(side, side, dim)
  resized = jnp.einsum(
      'ai,bj,ijd->abd',
      jnp.asarray(mh, pos_embed.dtype), jnp.asarray(mw, pos_embed.dtype),
      patches, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate(
      [pos_embed[:1], resized.reshape(gh * gw, dim).astype(pos_embed.dtype)],
      axis=0)
