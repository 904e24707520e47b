"""Retrieval: hand-worked metrics, COCO / Flickr30k readers, the encoder, parity with open_clip."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from cosmos_jax import models
from cosmos_jax.data.synthetic import SyntheticConfig
from cosmos_jax.eval import report, retrieval
from cosmos_jax.eval.encode import Encoder, ImageSource
from cosmos_jax.tokenizer import tokenize
from random_params import random_params

SIZES = [(40, 30), (30, 50), (32, 32), (64, 48)]
CAPTIONS = [['a red square', 'a square that is red'], ['a dog on grass', 'green lawn', 'a pet'],
            ['a blue circle'], ['two cats', 'cats sleeping']]


def write_images(folder, fmt='jpg'):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  names = []
  for i, (w, h) in enumerate(SIZES):
    name = f'{i:03d}.{fmt if i % 2 == 0 else "png"}'
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    names.append(name)
  return names


def write_coco(root, image_dir='images/val2017'):
  names = write_images(root / image_dir)
  images = [{'id': 100 + i, 'file_name': n} for i, n in enumerate(names)]
  anns = [{'image_id': 100 + i, 'id': len(CAPTIONS) * i + j, 'caption': c}
          for i, caps in enumerate(CAPTIONS) for j, c in enumerate(caps)]
  anns.insert(2, {'image_id': 999, 'id': 77, 'caption': 'an image that is not listed'})
  (root / 'annotations').mkdir(parents=True, exist_ok=True)
  (root / 'annotations' / 'captions_val2017.json').write_text(
      json.dumps({'images': images, 'annotations': anns}))
  return root


def write_flickr(root, json_dir=None, prefix='flickr30k-images'):
  names = write_images(root / prefix)
  entries = [{'image': f'{prefix}/{n}', 'caption': caps} for n, caps in zip(names, CAPTIONS)]
  target = root if json_dir is None else root / json_dir
  (target / 'flickr30k_val.json').write_text(json.dumps(entries))
  (target / 'flickr30k_test.json').write_text(json.dumps(entries[:2]))
  return root


@pytest.fixture(scope='module')
def encoder():
  cfg = models.get_variant('tiny')
  return Encoder(cfg, random_params(cfg), batch_size=3, progress=False)


def test_metrics_hand_worked_several_captions():
  # 3 images, 5 captions; captions 0,1 -> image 0, 2,3 -> image 1, 4 -> image 2.
  sim = np.array([[0.9, 0.1, 0.8, 0.3, 0.2],
                  [0.7, 0.6, 0.5, 0.1, 0.4],
                  [0.5, 0.4, 0.3, 0.2, 0.1]])
  m = retrieval.retrieval_metrics(sim, [0, 0, 1, 1, 2])
  # i2t, 0-based: image 0 ranks c0 first -> 0; image 1 orders c0 c1 c2 c4 c3, best of {c2, c3}
  # is c2 at 2; image 2 orders c0..c4, c4 at 4. Ranks [0, 2, 4]: R@1 1/3, R@5 = R@10 = 3/3,
  # mean 2 + 1 = 3, median floor(2) + 1 = 3.
  assert m['i2t_R@1'] == pytest.approx(100 / 3)
  assert (m['i2t_R@5'], m['i2t_R@10'], m['i2t_mean_rank'], m['i2t_median_rank']) == (100, 100, 3, 3)
  # t2i: columns c0 (.9 .7 .5) gt 0 -> 0; c1 (.1 .6 .4) gt 0 -> 2; c2 (.8 .5 .3) gt 1 -> 1;
  # c3 (.3 .1 .2) gt 1 -> 2; c4 (.2 .4 .1) gt 2 -> 2. Ranks [0, 2, 1, 2, 2]: R@1 1/5,
  # mean 7/5 + 1 = 2.4, median of sorted [0 1 2 2 2] is 2 -> 3.
  assert m['t2i_R@1'] == pytest.approx(20)
  assert (m['t2i_R@5'], m['t2i_R@10'], m['t2i_median_rank']) == (100, 100, 3)
  assert m['t2i_mean_rank'] == pytest.approx(2.4)


def test_metrics_hand_worked_r5_r10_and_even_median():
  # sim[i, j] = -i - 0.01 j: every caption ranks image i at i; every image ranks caption j at j.
  # With txt_to_img = p, the t2i ranks are p and the i2t ranks are p^-1 (both permutations
  # of 0..11): R@1 1/12, R@5 5/12, R@10 10/12, mean 5.5 + 1, median floor(5.5) + 1 = 6.
  p = np.array([0, 3, 4, 5, 9, 11, 1, 2, 6, 7, 8, 10])
  sim = -np.arange(12)[:, None] - 0.01 * np.arange(12)[None, :]
  i2t, t2i = retrieval.retrieval_ranks(sim, p)
  np.testing.assert_array_equal(t2i, p)
  np.testing.assert_array_equal(i2t, np.argsort(p))
  m = retrieval.retrieval_metrics(sim, p)
  for d in ('i2t', 't2i'):
    assert [m[f'{d}_R@{k}'] for k in (1, 5, 10)] == pytest.approx([100 / 12, 500 / 12, 1000 / 12])
    assert (m[f'{d}_mean_rank'], m[f'{d}_median_rank']) == (6.5, 6)


def test_metrics_ties_and_errors():
  # All scores equal: ties go by index, so image 0 (caption 1) has rank 1, image 1 rank 0.
  i2t, t2i = retrieval.retrieval_ranks(np.zeros((2, 2)), [1, 0])
  np.testing.assert_array_equal(i2t, [1, 0])
  np.testing.assert_array_equal(t2i, [1, 0])
  with pytest.raises(ValueError, match='no caption, e.g. image 1'):
    retrieval.retrieval_metrics(np.zeros((2, 2)), [0, 0])
  with pytest.raises(ValueError, match='outside'):
    retrieval.retrieval_metrics(np.zeros((2, 2)), [0, 2])


def test_coco_reader_and_tiny_model(tmp_path, encoder, monkeypatch):
  ds = retrieval.coco(write_coco(tmp_path))
  assert len(ds.images) == 4 and ds.captions == [c for caps in CAPTIONS for c in caps]
  np.testing.assert_array_equal(ds.txt_to_img, [0, 0, 1, 1, 1, 2, 3, 3])
  assert ds.images[1].endswith('001.png')
  m = retrieval.evaluate_retrieval(encoder, ds)
  assert (m['num_images'], m['num_captions']) == (4, 8)
  for d in ('i2t', 't2i'):
    assert all(0 <= m[f'{d}_R@{k}'] <= 100 for k in (1, 5, 10))
    assert 1 <= m[f'{d}_median_rank'] <= {'i2t': 8, 't2i': 4}[d]
  # Identical image and caption features: everything is retrieved first.
  eye = np.eye(4, encoder.config.embed_dim, dtype=np.float32)
  monkeypatch.setattr(encoder, 'image_files', lambda items: eye[:len(items)])
  monkeypatch.setattr(encoder, 'strings', lambda texts: eye[ds.txt_to_img])
  m = retrieval.evaluate_retrieval(encoder, ds)
  assert m['i2t_R@1'] == m['t2i_R@1'] == 100 and m['t2i_mean_rank'] == 1


def test_coco_plain_layout_and_errors(tmp_path):
  ds = retrieval.coco(write_coco(tmp_path / 'a', image_dir='val2017'))
  assert ds.images[0].endswith('val2017/000.jpg')
  with pytest.raises(FileNotFoundError, match='root folder not found'):
    retrieval.coco(tmp_path / 'nope')
  (tmp_path / 'b').mkdir()
  with pytest.raises(FileNotFoundError, match='captions_val2017.json'):
    retrieval.coco(tmp_path / 'b')
  (tmp_path / 'a' / 'val2017' / '002.jpg').unlink()
  with pytest.raises(FileNotFoundError, match='002.jpg'):
    retrieval.coco(tmp_path / 'a')


def test_flickr_reader_layouts_and_errors(tmp_path):
  ds = retrieval.flickr30k(write_flickr(tmp_path / 'a'))
  assert ds.name == 'flickr30k_val' and len(ds.images) == 4 and len(ds.captions) == 8
  np.testing.assert_array_equal(ds.txt_to_img, [0, 0, 1, 1, 1, 2, 3, 3])
  test = retrieval.flickr30k(tmp_path / 'a', split='test')
  assert len(test.images) == 2 and len(test.captions) == 5
  # The reference's layout: json inside flickr30k-images/, paths relative to its parent.
  ref = retrieval.flickr30k(write_flickr(tmp_path / 'b', json_dir='flickr30k-images')
                            / 'flickr30k-images')
  assert all(Image.open(p).size for p in ref.images)
  with pytest.raises(ValueError, match='split'):
    retrieval.flickr30k(tmp_path / 'a', split='train')
  with pytest.raises(FileNotFoundError, match='not found'):
    retrieval.flickr30k(tmp_path / 'missing')
  (tmp_path / 'a' / 'flickr30k-images' / '001.png').unlink()
  with pytest.raises(FileNotFoundError, match='001.png'):
    retrieval.flickr30k(tmp_path / 'a')
  (tmp_path / 'a' / 'flickr30k_val.json').unlink()
  with pytest.raises(FileNotFoundError, match='flickr30k_val.json'):
    retrieval.flickr30k(tmp_path / 'a')


def test_encoder_padding_and_mesh(tmp_path, encoder):
  src = ImageSource(retrieval.coco(write_coco(tmp_path)).images, encoder.image_size)
  images = np.stack([src[i] for i in range(len(src))])
  tokens = tokenize([c for caps in CAPTIONS for c in caps])
  # Each row is the same whatever its batch and padding (4 = 3 + 1 padded, 1 + 2 padded, ...).
  want_img = np.concatenate([encoder.images(images[i:i + 1]) for i in range(4)])
  np.testing.assert_allclose(encoder.images(src), want_img, atol=1e-6)
  np.testing.assert_allclose(encoder.images(images[1:]), want_img[1:], atol=1e-6)
  want_txt = np.concatenate([encoder.texts(tokens[:2]), encoder.texts(tokens[2:])])
  np.testing.assert_allclose(encoder.texts(tokens), want_txt, atol=1e-6)
  norms = np.linalg.norm(want_img, axis=1)
  np.testing.assert_allclose(norms, 1, atol=1e-5)
  assert np.abs(want_img[0] - want_img[1]).max() > 1e-3
  assert encoder.images(images[:0]).shape == (0, encoder.config.embed_dim)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('data', 'fsdp'))
  sharded = Encoder(encoder.config, encoder.params, batch_size=3, mesh=mesh, progress=False)
  assert sharded.batch_size == 8
  np.testing.assert_allclose(sharded.images(images), want_img, atol=1e-6)
  with pytest.raises(ValueError, match='tokens must be'):
    encoder.texts(tokens[:, :10])


def test_synthetic_retrieval_and_grid(tmp_path, encoder):
  ds = retrieval.synthetic(SyntheticConfig(image_size=32, num_train=4, num_val=8))
  assert len(ds.images) == len(ds.captions) == 8 and ds.captions[0].endswith('background.')
  sim = retrieval.similarity(encoder, ds)
  m = retrieval.retrieval_metrics(sim, ds.txt_to_img)
  assert 0 <= m['t2i_R@1'] <= 100 and 1 <= m['i2t_mean_rank'] <= 8
  path = report.retrieval_grid_png(ds.images, ds.captions, sim, str(tmp_path / 'g' / 'grid.png'),
                                   queries=2, top_k=3, txt_to_img=ds.txt_to_img)
  with Image.open(path) as im:
    assert im.size[0] > im.size[1] > 0


def test_parity_with_open_clip(tmp_path, torch_modules):
  torch, _ = torch_modules
  ref = pytest.importorskip('torch_reference')
  from cosmos_jax.convert.mapping import torch_to_flax
  cfg = models.get_variant('tiny', cosmos=False)
  model = ref.build(cfg)
  enc = Encoder(cfg, torch_to_flax(model.state_dict(), cfg), batch_size=3, progress=False)
  ds = retrieval.coco(write_coco(tmp_path))
  sim = retrieval.similarity(enc, ds)
  src = ImageSource(ds.images, cfg.vision.image_size)
  images = torch.from_numpy(np.stack([src[i] for i in range(len(src))])).permute(0, 3, 1, 2)
  tokens = torch.from_numpy(tokenize(ds.captions).astype(np.int64))
  with torch.no_grad():
    want = model.encode_image(images, normalize=True) @ model.encode_text(tokens, normalize=True).T
  assert sim.shape == (4, 8)
  np.testing.assert_allclose(sim, want.numpy(), atol=1e-5, rtol=0)
