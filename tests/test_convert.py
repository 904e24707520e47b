"""Weight conversion against real open_clip models: exact round trips, layouts and errors."""

import json
import os

import jax
import numpy as np
import pytest

from cosmos_jax import convert as cv
from cosmos_jax.convert import mapping, torch_io
from cosmos_jax.models import VARIANTS, get_variant

torch = pytest.importorskip('torch')
TINY_NAME = 'cosmos-jax-test-tiny'


@pytest.fixture(scope='module')
def open_clip(torch_modules, tmp_path_factory):
  """open_clip, with the tiny test model registered as an open_clip model config."""
  _, oc = torch_modules
  cfg_dir = tmp_path_factory.mktemp('open_clip_cfg')
  with open(cfg_dir / f'{TINY_NAME}.json', 'w') as f:
    json.dump(VARIANTS['tiny'].replace(cosmos=False).to_open_clip_json(), f)
  oc.add_model_config(cfg_dir)
  return oc


def randomize(model, seed=0):
  """Every tensor random, so that a wrong transpose or swap cannot go unseen."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen))
  return model


def cosmos_extras(embed, vision_width, text_width, seed=1):
  """The 21 COSMOS-only tensors with the shapes of spec section 6.2."""
  gen = torch.Generator().manual_seed(seed)
  shapes = {'distill_logit_scale': (), 'image_token_mapping.weight': (embed, vision_width),
            'image_token_mapping.bias': (embed,), 'text_token_mapping.weight': (embed, text_width),
            'text_token_mapping.bias': (embed,)}
  for pooler, d in (('visual.attn_cross_pool', embed), ('text_attn_cross_pool', text_width)):
    shapes.update({f'{pooler}.attn.in_proj_weight': (3 * d, d),
                   f'{pooler}.attn.in_proj_bias': (3 * d,),
                   f'{pooler}.attn.out_proj.weight': (d, d), f'{pooler}.attn.out_proj.bias': (d,)})
    for ln in ('ln_q', 'ln_k'):
      shapes.update({f'{pooler}.{ln}.weight': (d,), f'{pooler}.{ln}.bias': (d,)})
  return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.fixture(scope='module')
def tiny_model(open_clip):
  return randomize(open_clip.create_model(TINY_NAME))


@pytest.fixture(scope='module')
def tiny_sd(tiny_model):
  return {k: v.clone() for k, v in tiny_model.state_dict().items()}


@pytest.fixture(scope='module')
def cosmos_ckpt(tiny_sd):
  """An official-layout COSMOS checkpoint of the tiny model, teacher differing from student."""
  student = {**tiny_sd, **cosmos_extras(64, 64, 64, seed=1)}
  teacher = {k: v + 1.0 for k, v in student.items()}
  return {'epoch': 7, 'name': 'tiny-run',
          'student': {f'module.{k}': v for k, v in student.items()}, 'teacher': teacher,
          'optimizer': {'state': {0: {'step': torch.tensor(3.0), 'exp_avg': torch.zeros(2)}},
                        'param_groups': [{'lr': 1e-3, 'params': [0]}]},
          'scaler': {'scale': 65536.0, 'growth_factor': 2.0}}


def assert_same(a, b):
  """Bitwise equal state dicts (torch tensors or numpy arrays)."""
  assert sorted(a) == sorted(b)
  for k in a:
    x, y = (np.asarray(v.numpy() if hasattr(v, 'numpy') else v) for v in (a[k], b[k]))
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert np.array_equal(x, y), k


def flat_shapes(tree):
  return {'/'.join(k.key for k in path): tuple(v.shape)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('name,cosmos,n_torch', [('tiny', True, 83), ('tiny', False, 62),
                                                 ('ViT-B-16', True, 323), ('ViT-B-16', False, 302)])
def test_table_matches_model_init(name, cosmos, n_torch):
  from cosmos_jax.models import init_params
  cfg = get_variant(name, cosmos=cosmos)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  assert flat_shapes(shapes) == mapping.flax_shapes(cfg)
  assert len(mapping.torch_shapes(cfg)) == n_torch


def test_round_trip_exact_tiny(tiny_sd):
  cfg = get_variant('tiny', cosmos=False)
  params = cv.torch_to_flax(tiny_sd, cfg)
  assert flat_shapes(params) == mapping.flax_shapes(cfg)
  v, t = params['visual'], {k: x.numpy() for k, x in tiny_sd.items()}
  np.testing.assert_array_equal(v['conv1']['kernel'],
                                t['visual.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v['transformer']['resblocks_1']['mlp']['c_fc']['kernel'],
                                t['visual.transformer.resblocks.1.mlp.c_fc.weight'].T)
  np.testing.assert_array_equal(params['text']['token_embedding']['embedding'],
                                t['token_embedding.weight'])
  assert_same(cv.flax_to_torch(params, cfg), tiny_sd)


def test_scanned_layers_round_trip_with_the_torch_keys(tiny_sd):
  """With ``scan_layers`` the body's blocks are stacked on one leading axis; the converter
  maps each slice to its torch block both ways, bit for bit."""
  cfg = get_variant('tiny', cosmos=False)
  stacked = cv.torch_to_flax(tiny_sd, cfg, scan_layers=True)
  body = stacked['visual']['transformer']
  n = cfg.vision.layers
  assert sorted(body) == ['resblocks', f'resblocks_{n - 1}']
  t = {k: x.numpy() for k, x in tiny_sd.items()}
  for i in range(n - 1):   # slice i is torch's block i, transposed as every Linear
    np.testing.assert_array_equal(body['resblocks']['mlp']['c_fc']['kernel'][i],
                                  t[f'visual.transformer.resblocks.{i}.mlp.c_fc.weight'].T)
  mapping.check_params(stacked, cfg)
  assert_same(cv.flax_to_torch(stacked, cfg), tiny_sd)


def test_vit_b32_infer_round_trip_and_strict_load(open_clip, tmp_path):
  model = randomize(open_clip.create_model('ViT-B-32'), seed=3)
  sd = model.state_dict()
  cfg = cv.infer_config(sd)
  assert (cfg.name, cfg.cosmos) == ('ViT-B-32', False)
  back = cv.flax_to_torch(cv.torch_to_flax(sd, cfg), cfg)
  assert_same(back, sd)
  path = tmp_path / 'b32.pt'
  cv.save_state_file(path, {'params': back}, 'open_clip')
  loaded = cv.load_state_file(path)
  assert len(loaded) == 302
  model.load_state_dict(loaded, strict=True)


def test_cosmos_checkpoint_both_trees_pt_and_safetensors(cosmos_ckpt, tmp_path):
  src = tmp_path / 'cosmos.pt'
  torch.save(cosmos_ckpt, src)
  summary = cv.convert(str(src), str(tmp_path / 'jax'))
  assert 'tiny (COSMOS)' in summary
  trees, cfg = cv.load_params_dir(tmp_path / 'jax')
  assert sorted(trees) == ['student', 'teacher'] and cfg.cosmos and cfg.name == 'tiny'
  student = {k[len('module.'):]: v for k, v in cosmos_ckpt['student'].items()}
  assert_same(cv.flax_to_torch(trees['teacher'], cfg), cosmos_ckpt['teacher'])

  cv.convert(str(tmp_path / 'jax'), str(tmp_path / 'back.pt'))  # COSMOS layout by default
  back = torch.load(tmp_path / 'back.pt', weights_only=True)
  assert (back['epoch'], back['name']) == (0, 'cosmos_jax')
  assert_same(back['student'], cosmos_ckpt['student'])
  assert_same(back['teacher'], cosmos_ckpt['teacher'])

  cv.convert(str(src), str(tmp_path / 'direct.pt'))  # epoch and name carried over
  assert (torch.load(tmp_path / 'direct.pt', weights_only=True)['epoch']) == 7

  cv.convert(str(tmp_path / 'jax'), str(tmp_path / 'back.safetensors'))
  flat = cv.load_state_file(tmp_path / 'back.safetensors')
  assert len(flat) == 2 * 83
  part = lambda role: {k[len(role) + 1:]: v for k, v in flat.items() if k.startswith(role + '.')}
  assert_same(part('student'), student)
  assert_same(part('teacher'), cosmos_ckpt['teacher'])
  again, _ = cv.load_params(str(tmp_path / 'back.safetensors'))
  assert sorted(again) == ['student', 'teacher']
  assert_same(cv.flax_to_torch(again['student'], cfg), student)


def test_open_clip_export_of_cosmos_checkpoint(cosmos_ckpt, tiny_model, tmp_path):
  src = tmp_path / 'cosmos.pt'
  torch.save(cosmos_ckpt, src)
  open_clip_keys = set(tiny_model.state_dict())
  for which, expected in (('both', cosmos_ckpt['teacher']), ('student', cosmos_ckpt['student'])):
    dst = tmp_path / f'{which}.safetensors'
    cv.convert(str(src), str(dst), layout='open_clip', which=which)
    sd = cv.load_state_file(dst)
    assert set(sd) == open_clip_keys
    expected = {k.removeprefix('module.'): v for k, v in expected.items()}
    assert_same(sd, {k: expected[k] for k in open_clip_keys})
  tiny_model.load_state_dict(sd, strict=True)
  cv.convert(str(src), str(tmp_path / 'teacher_only'), which='teacher')
  trees, _ = cv.load_params_dir(tmp_path / 'teacher_only')
  assert list(trees) == ['teacher']
  with pytest.raises(cv.ConversionError, match='layout'):
    cv.convert(str(tmp_path / 'both.safetensors'), str(tmp_path / 'x.pt'), layout='cosmos')


def test_open_clip_training_checkpoint_and_cosmos_layout_from_one_tree(tiny_sd, tmp_path):
  src = tmp_path / 'epoch_3.pt'
  full = {**tiny_sd, **cosmos_extras(64, 64, 64)}
  torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in full.items()}}, src)
  assert list(torch_io.split_checkpoint(torch.load(src, weights_only=True))) == ['params']
  cv.convert(str(src), str(tmp_path / 'out.pt'))
  out = torch.load(tmp_path / 'out.pt', weights_only=True)
  assert_same(out['teacher'], full)  # teacher := student
  assert_same(out['student'], {f'module.{k}': v for k, v in full.items()})


def test_bfloat16_reads_through_float32(tiny_sd):
  cfg = get_variant('tiny', cosmos=False)
  sd16 = {k: v.to(torch.bfloat16) for k, v in tiny_sd.items()}
  params = cv.torch_to_flax(sd16, cfg)
  back = cv.flax_to_torch(params, cfg)
  assert_same(back, {k: v.float() for k, v in sd16.items()})
  kept = cv.torch_to_flax(sd16, cfg, dtype=None)
  assert kept['visual']['proj'].dtype.name == 'bfloat16'
  assert_same(cv.flax_to_torch(kept, cfg, dtype=np.float32), back)


def test_infer_config(tiny_sd):
  tiny = cv.infer_config(tiny_sd)
  assert (tiny.name, tiny.cosmos) == ('tiny', False)
  assert cv.infer_config({**tiny_sd, **cosmos_extras(64, 64, 64)}) == VARIANTS['tiny']
  custom = get_variant('tiny', cosmos=False).replace(name='custom', embed_dim=96)
  custom = custom.replace(vision=custom.vision.__class__(image_size=48, patch_size=16, width=128,
                                                         layers=3, head_width=64))
  sd = {k: np.zeros(s, np.float32) for k, s in mapping.torch_shapes(custom).items()}
  got = cv.infer_config(sd)
  assert got.name == 'custom' and mapping.flax_shapes(got) == mapping.flax_shapes(custom)
  odd = custom.replace(vision=custom.vision.__class__(image_size=48, patch_size=16, width=96,
                                                      head_width=32))
  sd = {k: np.zeros(s, np.float32) for k, s in mapping.torch_shapes(odd).items()}
  with pytest.raises(cv.ConversionError, match='not multiples of 64.*pass a variant'):
    cv.infer_config(sd)


def test_state_dict_errors(tiny_sd):
  cfg = get_variant('tiny', cosmos=False)
  sd = dict(tiny_sd)
  del sd['visual.ln_post.bias']
  with pytest.raises(cv.ConversionError, match=r'missing.*visual\.ln_post\.bias'):
    cv.torch_to_flax(sd, cfg)
  with pytest.raises(cv.ConversionError, match=r'unexpected.*foo\.bar \(shape \(2, 3\)\)'):
    cv.torch_to_flax({**tiny_sd, 'foo.bar': torch.zeros(2, 3)}, cfg)
  shapes = r'visual\.proj: expected shape \(64, 64\).*got \(3, 4\)'
  with pytest.raises(cv.ConversionError, match=shapes):
    cv.torch_to_flax({**tiny_sd, 'visual.proj': torch.zeros(3, 4)}, cfg)
  with pytest.raises(cv.ConversionError, match='plain open_clip CLIP.*21 missing'):
    cv.torch_to_flax(tiny_sd, get_variant('tiny'))
  with pytest.raises(cv.ConversionError, match="'module.'"):
    cv.torch_to_flax({f'module.{k}': v for k, v in tiny_sd.items()}, cfg)


def test_file_errors(tiny_sd, tmp_path):
  good = tmp_path / 'good.pt'
  torch.save(tiny_sd, good)
  data = good.read_bytes()
  (tmp_path / 'cut.pt').write_bytes(data[:len(data) // 2])
  (tmp_path / 'notes.pt').write_text('these are not weights\n')
  torch.save({'lr': 0.1, 'note': 'hi'}, tmp_path / 'no_tensors.pt')
  (tmp_path / 'cut.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
  for name in ('cut.pt', 'notes.pt', 'cut.safetensors', 'missing.pt'):
    with pytest.raises(cv.ConversionError, match=name):
      cv.load_state_file(tmp_path / name)
  with pytest.raises(cv.ConversionError, match='no_tensors.pt.*without tensors'):
    cv.convert(str(tmp_path / 'no_tensors.pt'), str(tmp_path / 'out'))
  with pytest.raises(ValueError, match='unknown model variant'):
    cv.convert(str(good), str(tmp_path / 'out'), variant='ViT-Z-99')
  with pytest.raises(cv.ConversionError, match='no such directory'):
    cv.load_params_dir(tmp_path / 'nowhere')
  with pytest.raises(cv.ConversionError, match='not a cosmos_jax params directory'):
    cv.load_params_dir(tmp_path)


class _Payload:
  """Unpickling this would create a file: the proof that code in a checkpoint ran."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_pickle_with_code_is_refused(tmp_path):
  marker = tmp_path / 'code_ran'
  path = tmp_path / 'evil.pt'
  torch.save({'visual.proj': torch.zeros(2), 'payload': _Payload(str(marker))}, path)
  with pytest.raises(cv.ConversionError, match='untrusted pickle.*will not run') as err:
    cv.load_state_file(path)
  assert 'evil.pt' in str(err.value)
  assert not os.path.exists(marker)
