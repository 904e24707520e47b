"""The Flax model against real PyTorch: open_clip towers and a torch.nn COSMOS reference.

Weights are random (open_clip init plus a perturbation of every tensor), converted from the
PyTorch state_dict through the declarative mapping; all comparisons are float32, max abs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.convert.mapping import torch_to_flax
from cosmos_jax.models import CLIP, get_variant
from cosmos_jax.tokenizer import tokenize

torch = pytest.importorskip('torch')
ref = pytest.importorskip('torch_reference')

TOL = 1e-5
CAPTIONS = ['a photo of a cat', 'two dogs playing in the snow near a red house',
            'a diagram', '']


def nhwc(x):
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def np_(x):
  return x.detach().numpy() if hasattr(x, 'detach') else np.asarray(x)


def assert_close(a, b, tol=TOL, what=''):
  err = float(np.max(np.abs(np_(a) - np_(b))))
  assert err <= tol, f'{what}: max abs diff {err:.3g} > {tol:g}'
  return err


def random_texts(n, context, seed):
  """Token rows with SOT, random content, EOT at a random position and zero padding."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n, context), np.int64)
  for i in range(n):
    length = int(rng.integers(1, context - 1))
    out[i, 0] = 49406
    out[i, 1:length] = rng.integers(1, 49406, length - 1)
    out[i, length] = 49407
  return out


def _setup(name, cosmos):
  cfg = get_variant(name, cosmos=cosmos)
  model = ref.build(cfg)
  params = torch_to_flax(model.state_dict(), cfg)
  return cfg, model, jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize('name', ['tiny', 'ViT-B-32', 'ViT-B-16'])
def test_open_clip_towers(name):
  cfg, model, params = _setup(name, cosmos=False)
  s = cfg.vision.image_size
  images = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
  text = torch.from_numpy(tokenize(CAPTIONS).astype(np.int64))
  clip = CLIP(cfg)
  with torch.no_grad():
    img_t = model.encode_image(images, normalize=True)
    txt_t = model.encode_text(text, normalize=True)
    patch_t, _ = ref.visual_forward(model.visual, images)
    tokens_t, _ = ref.text_forward(model, text)
  img_j, img_aux = jax.jit(lambda p, x: clip.apply({'params': p}, x, method=CLIP.encode_image))(
      params, nhwc(images))
  txt_j, txt_aux = jax.jit(lambda p, t: clip.apply({'params': p}, t, method=CLIP.encode_text))(
      params, jnp.asarray(text.numpy(), jnp.int32))
  assert_close(img_j, img_t, what=f'{name} image embedding')
  assert_close(txt_j, txt_t, what=f'{name} text embedding')
  assert_close(img_aux['tokens'], patch_t, what=f'{name} patch tokens')
  assert_close(txt_aux['tokens'], tokens_t, what=f'{name} text tokens')


@pytest.mark.parametrize('name,size', [('tiny', 16), ('ViT-B-32', 96), ('ViT-B-16', 96)])
def test_local_crop_positional_resize(name, size):
  """A 96 px local crop through the tower, pos-emb resized as the official code does."""
  cfg, model, params = _setup(name, cosmos=False)
  images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    tokens_t, pooled_t = ref.visual_forward(model.visual, images)
  clip = CLIP(cfg)
  pooled_j, aux = clip.apply({'params': params}, nhwc(images), normalize=False,
                             method=CLIP.encode_image)
  assert aux['tokens'].shape == tokens_t.shape
  assert_close(pooled_j, pooled_t, what='local-crop pooled')
  assert_close(aux['tokens'], tokens_t, what='local-crop tokens')


@pytest.mark.parametrize('name', ['tiny', 'ViT-B-16'])
def test_csa_last_block(name):
  cfg, model, params = _setup(name, cosmos=False)
  s = cfg.vision.image_size
  images = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    tokens_t, _ = ref.visual_forward(model.visual, images, csa=True)
    plain_t, _ = ref.visual_forward(model.visual, images, csa=False)
  _, aux = CLIP(cfg).apply({'params': params}, nhwc(images), csa=True, method=CLIP.encode_image)
  assert_close(aux['tokens'], tokens_t, what='CSA tokens')
  # The CSA path must actually differ from the plain one.
  assert float(np.max(np.abs(np_(tokens_t) - np_(plain_t)))) > 1e-3


@pytest.mark.parametrize('name,global_size,local_size,batch', [
    ('tiny', 32, 16, 3), ('ViT-B-32', 224, 96, 2)])
def test_cosmos_student_and_teacher(name, global_size, local_size, batch):
  """Uni-modal and cross-modal features of the multi-crop student, and the teacher."""
  cfg, model, params = _setup(name, cosmos=True)
  g = torch.Generator().manual_seed(4)
  globals_ = [torch.randn(batch, 3, global_size, global_size, generator=g) for _ in range(2)]
  locals_ = [torch.randn(batch, 3, local_size, local_size, generator=g) for _ in range(6)]
  texts = random_texts(8 * batch, cfg.text.context_length, seed=5)           # view-major
  with torch.no_grad():
    out_t = ref.student_forward(model, globals_ + locals_, torch.from_numpy(texts), batch)
    teach_img_t = model.encode_image(torch.cat(globals_), normalize=True)
    teach_txt_t = model.encode_text(torch.from_numpy(texts[:2 * batch]), normalize=True)

  stack = lambda crops: jnp.stack([nhwc(c) for c in crops], axis=1)          # (B, V, H, W, 3)
  texts_j = jnp.asarray(texts.reshape(8, batch, -1).transpose(1, 0, 2), jnp.int32)  # (B, 8, C)
  clip = CLIP(cfg)
  out_j = jax.jit(lambda p, g_, l_, t_: clip.apply({'params': p}, g_, l_, t_, method=CLIP.student))(
      params, stack(globals_), stack(locals_), texts_j)
  for key in ('image_features', 'text_features', 'image_cross', 'text_cross'):
    flat = np.asarray(out_j[key]).reshape(-1, cfg.embed_dim)                 # (V*B, E)
    assert_close(flat, out_t[key], what=f'student {key}')
  # The cross-modal features must differ from the uni-modal ones (the poolers did something).
  assert float(np.max(np.abs(np.asarray(out_j['image_cross'] - out_j['image_features'])))) > 1e-3

  teach = clip.apply({'params': params}, stack(globals_), texts_j, method=CLIP.teacher)
  assert_close(np.asarray(teach['image_features']).reshape(-1, cfg.embed_dim), teach_img_t,
               what='teacher image')
  assert_close(np.asarray(teach['text_features']).reshape(-1, cfg.embed_dim), teach_txt_t,
               what='teacher text')
