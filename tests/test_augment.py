"""Multi-crop augmentation, eval transform and normalisation against torchvision."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cosmos_jax.data import augment as A


@pytest.fixture(scope='module')
def tv(torch_modules):
  torch, _ = torch_modules
  tvt = pytest.importorskip('torchvision.transforms')
  return torch, tvt, tvt.functional


def _noise_image(w, h, seed=0, lo=0, hi=256):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(lo, hi, (h, w, 3), dtype=np.uint8))


def _photo_like(w, h):
  """Smooth colourful image (so hue/saturation ops do real work)."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.stack([128 + 120 * np.sin(x / 7), 128 + 120 * np.cos(y / 5),
                  128 + 100 * np.sin((x + y) / 11)], -1)
  return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def test_shapes_dtypes_and_determinism():
  img = _photo_like(317, 211)
  g, l = A.multi_crop(img, np.random.default_rng(0))
  assert g.shape == (2, 224, 224, 3) and g.dtype == np.uint8
  assert l.shape == (6, 96, 96, 3) and l.dtype == np.uint8
  assert g.max() > 100 and l.max() > 100
  g2, l2 = A.multi_crop(img, np.random.default_rng(0))
  g3, _ = A.multi_crop(img, np.random.default_rng(1))
  np.testing.assert_array_equal(g, g2)
  np.testing.assert_array_equal(l, l2)
  assert not np.array_equal(g, g3)
  cfg = A.MultiCropConfig(global_size=32, local_size=16, num_local=0)
  g, l = A.multi_crop(img.convert('L'), np.random.default_rng(0), cfg)
  assert g.shape == (2, 32, 32, 3) and l.shape == (0, 16, 16, 3)


def _boxes(width, height, scale, n=2000, seed=0):
  rng = np.random.default_rng(seed)
  return np.array([A.random_resized_crop_box(width, height, scale, (3 / 4, 4 / 3), rng)
                   for _ in range(n)], np.float64)


def test_crop_box_statistics_local():
  # On a square image a local box always fits, so no draw is rejected: the area fraction
  # is exactly U(0.05, 0.4) up to rounding, and the log-ratio is uniform.
  side = 1000
  b = _boxes(side, side, (0.05, 0.4))
  left, top, w, h = b.T
  assert (left >= 0).all() and (top >= 0).all()
  assert (left + w <= side).all() and (top + h <= side).all()
  frac = w * h / side**2
  assert frac.min() > 0.05 - 0.002 and frac.max() < 0.4 + 0.002
  assert abs(frac.mean() - 0.225) < 0.008
  log_r = np.log(w / h)
  lo, hi = math.log(3 / 4), math.log(4 / 3)
  assert log_r.min() > lo - 0.01 and log_r.max() < hi + 0.01
  hist, _ = np.histogram(log_r, bins=5, range=(lo - 0.01, hi + 0.01))
  assert np.abs(hist / len(log_r) - 0.2).max() < 0.035
  # Positions are uniform over the free range.
  assert abs(np.mean(left / (side - w)) - 0.5) < 0.03


def test_crop_box_statistics_global():
  width, height = 640, 480
  b = _boxes(width, height, (0.4, 1.0))
  left, top, w, h = b.T
  assert (left + w <= width).all() and (top + h <= height).all()
  frac = w * h / (width * height)
  assert frac.min() > 0.4 - 0.005 and frac.max() <= 1.0
  r = w / h
  assert r.min() > 3 / 4 - 0.01 and r.max() < 4 / 3 + 0.01
  # Large boxes of the 'wrong' shape are rejected, which lowers the mean below 0.7.
  assert 0.55 < frac.mean() < 0.7


@pytest.mark.parametrize('size', [(1000, 10), (10, 1000), (50, 1), (2, 301)])
def test_crop_box_fallback_matches_torchvision(tv, size):
  _, tvt, _ = tv
  width, height = size
  i, j, h, w = tvt.RandomResizedCrop.get_params(
      Image.new('RGB', size), [0.4, 1.0], [3 / 4, 4 / 3])
  ours = A.random_resized_crop_box(width, height, (0.4, 1.0), (3 / 4, 4 / 3),
                                   np.random.default_rng(0))
  assert ours == (j, i, w, h)


def test_resized_crop_matches_torchvision(tv):
  _, tvt, F = tv
  img = _photo_like(203, 157)
  for box in [(0, 0, 203, 157), (13, 7, 101, 88), (150, 100, 20, 31)]:
    left, top, w, h = box
    want = F.resized_crop(img, top, left, h, w, [96, 96], tvt.InterpolationMode.BICUBIC)
    np.testing.assert_array_equal(np.asarray(A.resized_crop(img, box, 96)), np.asarray(want))


def _assert_same(ours, theirs):
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_colour_ops_match_torchvision(tv):
  _, _, F = tv
  img = _photo_like(67, 45)
  for f in [0.6, 0.93, 1.0, 1.37]:
    _assert_same(A.adjust_brightness(img, f), F.adjust_brightness(img, f))
    _assert_same(A.adjust_contrast(img, f), F.adjust_contrast(img, f))
    _assert_same(A.adjust_saturation(img, f), F.adjust_saturation(img, f))
  for f in [-0.1, -0.0371, -0.001, 0.0, 0.002, 0.05, 0.1, 0.5, -0.5]:
    _assert_same(A.adjust_hue(img, f), F.adjust_hue(img, f))
  _assert_same(A.to_grayscale(img), F.rgb_to_grayscale(img, num_output_channels=3))
  _assert_same(A.solarize(img, 128), F.solarize(img, 128))


def test_color_jitter_order_and_ranges(tv):
  _, _, F = tv
  img = _photo_like(40, 30)
  cfg = A.MultiCropConfig()
  ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
  for seed in range(8):
    r = np.random.default_rng(seed)
    order = r.permutation(4)
    factors = [r.uniform(0.6, 1.4), r.uniform(0.6, 1.4), r.uniform(0.8, 1.2),
               r.uniform(-0.1, 0.1)]
    want = img
    for k in order:
      want = ops[k](want, float(factors[k]))
    _assert_same(A.color_jitter(img, np.random.default_rng(seed), cfg), want)


def _identity_cfg(size, **kw):
  """Crops that are the whole (square) image, every random op off unless given."""
  base = dict(global_size=size, local_size=size, global_scale=(1.0, 1.0),
              local_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
              grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))
  base.update(kw)
  return A.MultiCropConfig(**base)


def _rates(img, cfg, changed, n, seed=0):
  """Fraction of views (global 1, global 2, all locals) for which changed(view) holds."""
  rng = np.random.default_rng(seed)
  hits = np.zeros(3)
  for _ in range(n):
    g, l = A.multi_crop(img, rng, cfg)
    hits += [changed(g[0]), changed(g[1]), np.mean([changed(v) for v in l])]
  return hits / n


def test_identity_config_is_identity():
  img = _noise_image(24, 24)
  g, l = A.multi_crop(img, np.random.default_rng(0), _identity_cfg(24))
  for v in (*g, *l):
    np.testing.assert_array_equal(v, np.asarray(img))


def test_blur_probabilities():
  # Pixels < 128 so solarize never fires; radius >= 1 so every blur is visible (near the
  # official minimum radius 0.1, PIL's blur can leave this low-contrast noise unchanged).
  img = _noise_image(24, 24, lo=0, hi=128)
  ref = np.asarray(img)
  cfg = _identity_cfg(24, blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0),
                      blur_radius=(1.0, 2.0))
  rates = _rates(img, cfg, lambda v: not np.array_equal(v, ref), 1500)
  np.testing.assert_allclose(rates, [1.0, 0.1, 0.5], atol=0.025)


def test_solarize_probabilities():
  img = Image.new('RGB', (24, 24), (200, 130, 201))  # blur leaves a flat image as is
  cfg = _identity_cfg(24, blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0))
  rates = _rates(img, cfg, lambda v: v[0, 0, 0] == 55, 1500)
  np.testing.assert_allclose(rates, [0.0, 0.2, 0.0], atol=0.025)


def test_flip_grayscale_jitter_probabilities():
  img = _photo_like(24, 24)
  ref = np.asarray(img)

  def gray(v):
    return np.array_equal(v[..., 0], v[..., 1]) and np.array_equal(v[..., 1], v[..., 2])

  flips = _rates(img, _identity_cfg(24, flip_p=0.5),
                 lambda v: np.array_equal(v, ref[:, ::-1]), 800)
  grays = _rates(img, _identity_cfg(24, grayscale_p=0.2), gray, 800)
  jitter = _rates(img, _identity_cfg(24, jitter_p=0.8),
                  lambda v: not np.array_equal(v, ref), 800)
  np.testing.assert_allclose(flips, 0.5, atol=0.05)
  np.testing.assert_allclose(grays, 0.2, atol=0.04)
  np.testing.assert_allclose(jitter, 0.8, atol=0.04)


@pytest.mark.parametrize('size', [(301, 227), (227, 301), (225, 225), (500, 223), (97, 131)])
def test_eval_transform_matches_torchvision(tv, size):
  torch, tvt, _ = tv
  img = _photo_like(*size)
  ref = tvt.Compose([
      tvt.Resize(224, interpolation=tvt.InterpolationMode.BICUBIC),
      tvt.CenterCrop(224), tvt.ToTensor(),
      tvt.Normalize(A.CLIP_MEAN.tolist(), A.CLIP_STD.tolist())])(img)
  ours = A.eval_transform(img)
  assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref.permute(1, 2, 0).numpy(), atol=1e-6, rtol=0)


def test_normalize_numpy_and_jax():
  x = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  want = (x.astype(np.float64) / 255 - A.CLIP_MEAN.astype(np.float64)) / A.CLIP_STD
  got = A.normalize(x)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  on_device = jax.jit(A.normalize)(jnp.asarray(x))
  assert on_device.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(on_device), got, atol=1e-6, rtol=0)


def test_config_validation():
  with pytest.raises(ValueError):
    A.MultiCropConfig(interpolation='cubic')
  with pytest.raises(ValueError):
    A.MultiCropConfig(blur_p=(1.0, 0.5))
