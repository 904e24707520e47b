"""Variants, the open_clip JSON path, parameter counts and the init distributions of spec 1.7."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax import models
from cosmos_jax.models import CLIP, get_variant, init_params


def count(config):
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  return sum(x.size for x in jax.tree.leaves(shapes)), len(jax.tree.leaves(shapes))


@pytest.mark.parametrize('name,cosmos,params,tensors', [
    # Figures of the spec (section 6.2), counted from the PyTorch models.
    ('ViT-B-16', True, 152_382_466, 323),
    ('ViT-B-32', True, 154_039_042, 323),
    ('ViT-B-16', False, 149_620_737, 302),
    ('ViT-B-32', False, 151_277_313, 302),
])
def test_parameter_counts_match_reference(name, cosmos, params, tensors):
  assert count(get_variant(name, cosmos=cosmos)) == (params, tensors)


@pytest.mark.parametrize('spelling', ['ViT-B-16', 'ViT-B/16', 'vit_b16', 'vitb16'])
def test_variant_spellings(spelling):
  assert get_variant(spelling).name == 'ViT-B-16'


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match=r"unknown model variant 'ViT-Q-99'.*ViT-B-16"):
    get_variant('ViT-Q-99')


def test_open_clip_json(tmp_path):
  cfg = {'embed_dim': 256,
         'vision_cfg': {'image_size': 64, 'layers': 3, 'width': 192, 'head_width': 48,
                        'patch_size': 16, 'attn_pooler_heads': 4},
         'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 256, 'heads': 4,
                      'layers': 2, 'attn_pooler_heads': 2}}
  path = tmp_path / 'My-ViT.json'
  path.write_text(json.dumps(cfg))
  config = get_variant(str(path))
  assert config.name == 'My-ViT' and config.vision.heads == 4
  params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  assert params['visual']['positional_embedding'].shape == (17, 192)
  # Head counts of the cross poolers come from the config: 4 heads of 64 in the vision one.
  assert params['visual']['attn_cross_pool']['attn']['in_proj_weight'].shape == (768, 256)
  assert config.to_open_clip_json()['vision_cfg']['attn_pooler_heads'] == 4
  assert get_variant(json.dumps(cfg)).embed_dim == 256


@pytest.mark.parametrize('bad,match', [
    ({'embed_dim': 64, 'vision_cfg': {'widht': 3}}, r"unsupported vision_cfg fields \['widht'\]"),
    ({'embed_dim': 64, 'quick_gelu': True}, 'quick_gelu'),
    ({'vision_cfg': {}}, 'missing embed_dim'),
    ({'embed_dim': 64, 'text_cfg': {'width': 32}}, 'text width == embed_dim'),
    ({'embed_dim': 64, 'vision_cfg': {'width': 100}}, 'not a multiple of head_width'),
])
def test_bad_model_json(bad, match):
  with pytest.raises(ValueError, match=match):
    models.from_open_clip_json(bad)


def test_missing_json_file():
  with pytest.raises(FileNotFoundError, match='nope.json'):
    get_variant('nope.json')


def _std_close(x, std, rel=0.03):
  got = float(np.std(np.asarray(x)))
  assert abs(got - std) <= rel * std, f'std {got:.5g}, expected {std:.5g}'


def test_init_distributions_follow_the_reference():
  """Spec 1.7: text tower normal stds; ViT at PyTorch defaults; scales at log(1/0.07)."""
  cfg = get_variant('ViT-B-32')
  p = init_params(cfg, jax.random.key(0))
  w, wt, layers = 768, 512, 12
  t = p['text']
  _std_close(t['token_embedding']['embedding'], 0.02)
  _std_close(t['positional_embedding'], 0.01)
  _std_close(t['text_projection'], wt ** -0.5)
  blk = t['transformer']['resblocks_3']
  _std_close(blk['attn']['in_proj_weight'], wt ** -0.5)
  _std_close(blk['attn']['out_proj']['kernel'], wt ** -0.5 * (2 * layers) ** -0.5)
  _std_close(blk['mlp']['c_fc']['kernel'], (2 * wt) ** -0.5)
  _std_close(blk['mlp']['c_proj']['kernel'], wt ** -0.5 * (2 * layers) ** -0.5)
  assert not np.any(blk['attn']['in_proj_bias']) and not np.any(blk['attn']['out_proj']['bias'])
  # Linear biases keep PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  bias = np.asarray(blk['mlp']['c_fc']['bias'])
  assert np.abs(bias).max() <= wt ** -0.5 and np.abs(bias).max() > 0.9 * wt ** -0.5

  v = p['visual']
  uniform_std = lambda bound: bound / math.sqrt(3)
  _std_close(v['class_embedding'], w ** -0.5, rel=0.08)
  _std_close(v['positional_embedding'], w ** -0.5)
  _std_close(v['proj'], w ** -0.5)
  _std_close(v['conv1']['kernel'], uniform_std(1 / math.sqrt(3 * 32 * 32)))
  vblk = v['transformer']['resblocks_0']
  _std_close(vblk['attn']['in_proj_weight'], uniform_std(math.sqrt(6 / (4 * w))))   # xavier
  _std_close(vblk['attn']['out_proj']['kernel'], uniform_std(1 / math.sqrt(w)))     # kaiming(√5)
  _std_close(vblk['mlp']['c_fc']['kernel'], uniform_std(1 / math.sqrt(w)))
  np.testing.assert_array_equal(vblk['ln_1']['scale'], np.ones(w))
  np.testing.assert_array_equal(vblk['ln_1']['bias'], np.zeros(w))

  _std_close(p['image_token_mapping']['kernel'], uniform_std(1 / math.sqrt(w)))
  _std_close(p['visual']['attn_cross_pool']['attn']['in_proj_weight'],
             uniform_std(math.sqrt(6 / (4 * 512))))
  for name in ('logit_scale', 'distill_logit_scale'):
    assert float(p[name]) == pytest.approx(math.log(1 / 0.07), abs=1e-6)


def test_init_is_deterministic_and_keyed():
  cfg = get_variant('tiny')
  a, b = init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(0))
  c = init_params(cfg, jax.random.key(1))
  same = jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b)
  assert all(jax.tree.leaves(same))
  assert not np.allclose(a['visual']['proj'], c['visual']['proj'])


def test_remat_and_bfloat16_run_and_agree():
  cfg = get_variant('tiny')
  p = init_params(cfg, jax.random.key(0))
  imgs = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  txt = jnp.zeros((2, 77), jnp.int32).at[:, 0].set(49406).at[:, 5].set(49407)
  ref = CLIP(cfg).apply({'params': p}, imgs, txt)
  rem = CLIP(cfg, remat=True).apply({'params': p}, imgs, txt)
  bf = CLIP(cfg, dtype=jnp.bfloat16).apply({'params': p}, imgs, txt)
  np.testing.assert_allclose(rem['image_features'], ref['image_features'], atol=1e-6)
  assert bf['image_features'].dtype == jnp.float32
  np.testing.assert_allclose(bf['image_features'], ref['image_features'], atol=5e-2)
  np.testing.assert_allclose(bf['text_features'], ref['text_features'], atol=5e-2)


def test_gradients_flow_to_every_student_parameter():
  cfg = get_variant('tiny')
  p = init_params(cfg, jax.random.key(0))
  g = jax.random.normal(jax.random.key(1), (2, 2, 32, 32, 3))
  l = jax.random.normal(jax.random.key(2), (2, 6, 16, 16, 3))
  t = jnp.zeros((2, 8, 77), jnp.int32).at[..., 0].set(49406).at[..., 4].set(49407)
  t = t.at[..., 1:4].set(jax.random.randint(jax.random.key(3), (2, 8, 3), 1, 49406))

  def loss(params):
    out = CLIP(cfg).apply({'params': params}, g, l, t, method=CLIP.student)
    return sum(jnp.sum(jnp.sin(3 * out[k])) for k in ('image_features', 'text_features',
                                                      'image_cross', 'text_cross')) \
        + out['logit_scale'] + out['distill_logit_scale']

  grads = jax.jit(jax.grad(loss))(p)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = ['/'.join(k.key for k in path) for path, x in flat if not np.any(np.asarray(x))]
  # Only rows of tokens that never occur get no gradient; every tensor must get some.
  assert not dead, f'no gradient reaches {dead}'


def test_clip_only_student_encodes_globals_and_all_captions():
  """The CLIP-only baseline's student: global crops and captions through the plain encoders."""
  cfg = models.get_variant('tiny', cosmos=False)
  model = models.CLIP(cfg)
  params = models.init_params(cfg, jax.random.key(1))
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.standard_normal((3, 2, 32, 32, 3)), jnp.float32)
  loc = jnp.asarray(rng.standard_normal((3, 6, 16, 16, 3)), jnp.float32)
  txt = jnp.asarray(rng.integers(1, 1000, (3, 8, cfg.text.context_length)), jnp.int32)
  out = model.apply({'params': params}, g, loc, txt, method=models.CLIP.student)
  img, _ = model.apply({'params': params}, g[:, 1], method=models.CLIP.encode_image)
  tx, _ = model.apply({'params': params}, txt[:, 5], method=models.CLIP.encode_text)
  assert out['image_features'].shape == (2, 3, cfg.embed_dim)
  assert out['text_features'].shape == (8, 3, cfg.embed_dim)
  np.testing.assert_allclose(out['image_features'][1], img, atol=1e-6)
  np.testing.assert_allclose(out['text_features'][5], tx, atol=1e-6)
  assert 'image_cross' not in out
