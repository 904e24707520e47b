"""resize_pos_embed against torch F.interpolate as the official code calls it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.models.posemb import bicubic_matrix, resize_pos_embed


def _official(torch, pos_embed: np.ndarray, gh: int, gw: int) -> np.ndarray:
  """The resize of the official `interpolate_pos_encoding`, in torch."""
  pe = torch.from_numpy(pos_embed)
  n, dim = pe.shape[0] - 1, pe.shape[1]
  side = int(math.sqrt(n))
  grid = pe[1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
  out = torch.nn.functional.interpolate(
      grid, scale_factor=((gh + 0.1) / math.sqrt(n), (gw + 0.1) / math.sqrt(n)),
      mode='bicubic', align_corners=False)
  assert out.shape[-2:] == (gh, gw)
  out = out.permute(0, 2, 3, 1).reshape(gh * gw, dim)
  return torch.cat([pe[:1], out], dim=0).numpy()


def _assert_torch_close(out, ref32, ref64) -> float:
  """Max |out - torch float32|, bounded by torch's own float32 error."""
  err = float(np.abs(out - ref32).max())
  # torch's float32 result is itself 1e-6..4.5e-6 away from its float64 one on
  # these inputs (accumulation order, float32 rounding in its cubic weights), so
  # no float32 reimplementation can be held to 1e-6 of it for D=768.
  torch_own = float(np.abs(ref32 - ref64).max())
  assert err <= max(1e-6, 1.5 * torch_own) and err <= 5e-6, (err, torch_own)
  return err


CASES = [  # (side, target, dim): B/16 local crop, B/32, L/14, tiny.
    (14, 6, 768),
    (7, 3, 768),
    (16, 6, 1024),
    (4, 2, 8),
]


@pytest.mark.parametrize('side,target,dim', CASES)
def test_matches_torch_float32(torch_modules, side, target, dim):
  torch, _ = torch_modules
  rng = np.random.default_rng(side * 100 + target)
  pe = rng.standard_normal((1 + side * side, dim)).astype(np.float32)
  ref = _official(torch, pe, target, target)
  ref64 = _official(torch, pe.astype(np.float64), target, target)
  out = np.asarray(jax.jit(resize_pos_embed, static_argnums=1)(
      jnp.asarray(pe), (target, target)))
  assert out.shape == (1 + target * target, dim) and out.dtype == np.float32
  _assert_torch_close(out, ref, ref64)
  np.testing.assert_array_equal(out[0], pe[0])


@pytest.mark.parametrize('side,target', [(14, 6), (7, 3)])
def test_within_1e6_of_torch_at_the_reference_init_scale(torch_modules, side, target):
  """B/16 and B/32 positional embeddings as the reference initialises them (768**-0.5 * randn)."""
  torch, _ = torch_modules
  rng = np.random.default_rng(side)
  pe = (768 ** -0.5 * rng.standard_normal((1 + side * side, 768))).astype(np.float32)
  ref = _official(torch, pe, target, target)
  out = np.asarray(resize_pos_embed(jnp.asarray(pe), (target, target)))
  assert float(np.abs(out - ref).max()) <= 1e-6


@pytest.mark.parametrize('side,target,dim', CASES + [(14, 20, 4)])
def test_matrices_exact_in_float64(torch_modules, side, target, dim):
  """The interpolation matrices are torch's bicubic, exactly (float64)."""
  torch, _ = torch_modules
  rng = np.random.default_rng(side)
  pe = rng.standard_normal((1 + side * side, dim))
  ref = _official(torch, pe, target, target)[1:].reshape(target, target, dim)
  m = bicubic_matrix(side, target, (target + 0.1) / side)
  out = np.einsum('ai,bj,ijd->abd', m, m, pe[1:].reshape(side, side, dim))
  assert np.abs(out - ref).max() < 1e-12


@pytest.mark.parametrize('side,target', [(14, 6), (16, 6)])
def test_float32_coordinates_match_torch_weights(torch_modules, side, target):
  """Float32 source coordinates reproduce torch's float32 weights."""
  torch, _ = torch_modules
  scale = (target + 0.1) / side
  # One-hot columns through a height-only resize read off torch's weights.
  eye = torch.eye(side, dtype=torch.float32).reshape(side, 1, side, 1)
  w = torch.nn.functional.interpolate(
      eye, scale_factor=(scale, 1.0), mode='bicubic', align_corners=False)
  w = w[:, 0, :, 0].T.double().numpy()
  m32 = bicubic_matrix(side, target, scale, coord_dtype=np.float32)
  m64 = bicubic_matrix(side, target, scale)
  # What is left is torch's float32 rounding in the cubic polynomials.
  assert np.abs(m32 - w).max() < 1e-6
  assert np.abs(m32 - w).mean() < 0.6 * np.abs(m64 - w).mean()


def test_non_square_target(torch_modules):
  torch, _ = torch_modules
  pe = np.random.default_rng(1).standard_normal((1 + 49, 8)).astype(np.float32)
  out = np.asarray(resize_pos_embed(jnp.asarray(pe), (3, 5)))
  assert out.shape == (1 + 15, 8)
  _assert_torch_close(out, _official(torch, pe, 3, 5),
                      _official(torch, pe.astype(np.float64), 3, 5))


def test_same_size_is_identity():
  pe = jnp.asarray(np.random.default_rng(2).standard_normal((197, 16)),
                   jnp.float32)
  assert resize_pos_embed(pe, (14, 14)) is pe


def test_bicubic_matrix_by_hand():
  # 7 -> 3 with scale 3.1/7: output 0 samples (0 + 0.5) * 7/3.1 - 0.5.
  scale = 3.1 / 7
  m = bicubic_matrix(7, 3, scale)
  assert m.shape == (3, 7)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-14)
  src = 0.5 * 7 / 3.1 - 0.5  # 0.629..., so taps -1, 0, 1, 2 and t = src.
  t = src
  a = -0.75
  keys_near = lambda x: (a + 2) * x**3 - (a + 3) * x**2 + 1
  keys_far = lambda x: a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
  w = [keys_far(1 + t), keys_near(t), keys_near(1 - t), keys_far(2 - t)]
  np.testing.assert_allclose(m[0, 0], w[0] + w[1], atol=1e-14)  # tap -1 -> 0.
  np.testing.assert_allclose(m[0, 1:3], w[2:], atol=1e-14)
  np.testing.assert_array_equal(m[0, 3:], 0.0)
  # The size-based map (7/3) would give different weights.
  assert not np.allclose(m, bicubic_matrix(7, 3, 3 / 7))


def test_gradient_is_column_sums():
  side, target, dim = 7, 3, 4
  pe = jnp.asarray(np.random.default_rng(3).standard_normal(
      (1 + side * side, dim)), jnp.float32)
  grad = jax.grad(lambda p: resize_pos_embed(p, (target, target)).sum())(pe)
  m = bicubic_matrix(side, target, (target + 0.1) / side,
                     coord_dtype=np.float32)
  expected = np.outer(m.sum(0), m.sum(0)).reshape(-1, 1) * np.ones((1, dim))
  np.testing.assert_allclose(grad[0], 1.0)
  np.testing.assert_allclose(grad[1:], expected, atol=1e-6)


@pytest.mark.parametrize('shape,grid', [
    ((1 + 50, 8), (3, 3)),   # 50 positions: not a square grid.
    ((1 + 49, 8), (0, 3)),   # empty grid.
    ((1 + 49, 8), (2.5, 3)),  # not an int.
    ((1 + 49,), (3, 3)),     # not (1 + N, D).
])
def test_bad_inputs_raise(shape, grid):
  with pytest.raises(ValueError):
    resize_pos_embed(jnp.zeros(shape, jnp.float32), grid)
