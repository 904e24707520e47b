"""Zero-shot classification: prompts, ImageFolder reading, accuracy and class embeddings."""

import json

import numpy as np
import pytest
from PIL import Image

from cosmos_jax import models
from cosmos_jax.data.synthetic import SyntheticConfig, SyntheticDataset
from cosmos_jax.eval import classification as cls
from cosmos_jax.eval import report
from cosmos_jax.eval.encode import Encoder
from random_params import random_params

FOLDERS = {'n02': 2, 'n01': 3, 'n03': 1}  # unsorted on purpose: labels follow sorted order


@pytest.fixture(scope='module')
def encoder():
  cfg = models.get_variant('tiny')
  return Encoder(cfg, random_params(cfg), batch_size=4, progress=False)


def write_folder(root):
  rng = np.random.default_rng(0)
  for folder, n in FOLDERS.items():
    for i in range(n):
      sub = root / folder / ('nested' if i == 2 else '')
      sub.mkdir(parents=True, exist_ok=True)
      im = Image.fromarray(rng.integers(0, 256, (24 + 8 * i, 40, 3), dtype=np.uint8))
      im.save(sub / f'img{i}.{"JPEG" if i % 2 else "png"}')
  (root / 'n01' / 'notes.txt').write_text('not an image')
  (root / 'classnames.txt').write_text('goldfish\nshark\n\nhen\n')
  return root


def test_package_prompts():
  names, templates = cls.imagenet_class_names(), cls.openai_templates()
  assert len(names) == 1000 and len(set(names)) == 998  # 'crane' and 'maillot' appear twice
  assert names[0] == 'tench' and names[-1] == 'toilet paper'
  assert len(templates) == 80 and templates[0] == 'a bad photo of a {}.'
  assert templates[-1] == 'a tattoo of the {}.'
  try:
    import open_clip
  except ImportError:
    return
  assert names == tuple(open_clip.IMAGENET_CLASSNAMES)
  assert [t.format('x') for t in templates] == [f('x') for f in open_clip.OPENAI_IMAGENET_TEMPLATES]


def test_topk_hand_worked():
  logits = np.array([[9., 1, 2, 3, 4, 5],    # label 0 is the max -> rank 0
                     [1., 9, 8, 7, 6, 5],    # label 5: 9 8 7 6 are above -> rank 4
                     [1., 2, 3, 4, 5, 6],    # label 0: five above -> rank 5
                     [3., 3, 1, 1, 1, 1]])   # label 1 ties class 0, lower index first -> rank 1
  labels = np.array([0, 5, 0, 1])
  np.testing.assert_array_equal(cls.label_ranks(logits, labels), [0, 4, 5, 1])
  # top-1: 1 of 4; top-5 (rank < 5): 3 of 4.
  assert cls.topk_accuracy(logits, labels) == {'top1': 25.0, 'top5': 75.0}
  assert cls.topk_accuracy(logits[:, :4], np.array([0, 1, 0, 1])) == {'top1': 50.0}


def test_image_folder(tmp_path, encoder, monkeypatch):
  root = write_folder(tmp_path / 'data')
  ds = cls.image_folder(root, root / 'classnames.txt')
  assert ds.class_names == ['goldfish', 'shark', 'hen'] and len(ds.templates) == 80
  np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 2])
  assert [p.split('data/')[1] for p in ds.images[:3]] == ['n01/img0.png', 'n01/img1.JPEG',
                                                          'n01/nested/img2.png']
  m = cls.evaluate_classification(encoder, ds)
  assert 0 <= m['top1'] <= 100 and 'top5' not in m
  assert (m['num_images'], m['num_classes']) == (6, 3)
  # Image features equal to their class embedding: every image is classified right.
  weights = encoder.class_embeddings(ds.class_names, ds.templates)
  monkeypatch.setattr(encoder, 'image_files', lambda items: weights[ds.labels])
  assert cls.evaluate_classification(encoder, ds)['top1'] == 100
  plain = cls.image_folder(root, templates=['a {}'])
  assert plain.class_names == ['n01', 'n02', 'n03'] and plain.templates == ['a {}']


def test_folder_errors(tmp_path):
  root = write_folder(tmp_path / 'data')
  (tmp_path / 'four.txt').write_text('a\nb\nc\nd\n')
  with pytest.raises(ValueError, match=r'four\.txt lists 4 class names but .* has 3 class folders'):
    cls.image_folder(root, tmp_path / 'four.txt')
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    cls.image_folder(root, tmp_path / 'missing.txt')
  with pytest.raises(FileNotFoundError, match='dataset folder not found'):
    cls.image_folder(tmp_path / 'nope')
  (tmp_path / 'bad.txt').write_text('a photo of a {}\na photo\n')
  with pytest.raises(ValueError, match=r'bad\.txt: template 2'):
    cls.image_folder(root, templates_file=tmp_path / 'bad.txt')
  (root / 'n04').mkdir()
  with pytest.raises(FileNotFoundError, match='n04 has no images'):
    cls.image_folder(root)


def test_templates_file_dataset(tmp_path):
  root = write_folder(tmp_path / 'data')
  (tmp_path / 't.txt').write_text('a photo of a {}.\nart of the {}.\n')
  ds = cls.image_folder(root, root / 'classnames.txt', tmp_path / 't.txt', name='toy')
  assert ds.name == 'toy' and ds.templates == ['a photo of a {}.', 'art of the {}.']


def test_class_embeddings_against_numpy(encoder):
  names = ['goldfish', 'great white shark', 'hen']
  templates = ['a photo of a {}.', 'a drawing of the {}.', lambda c: f'itap of a {c}']
  got = encoder.class_embeddings(names, templates)
  want = []
  for c in names:
    prompts = [t.format(c) if isinstance(t, str) else t(c) for t in templates]
    feats = np.concatenate([encoder.strings([p]) for p in prompts])  # one at a time
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    mean = feats.mean(0)
    want.append(mean / np.linalg.norm(mean))
  assert got.shape == (3, encoder.config.embed_dim) and got.dtype == np.float32
  np.testing.assert_allclose(got, np.stack(want), atol=1e-6)


def test_synthetic_classification(encoder):
  data = SyntheticDataset(SyntheticConfig(image_size=32, num_train=4, num_val=8), split='val')
  ds = cls.synthetic(data)
  assert ds.class_names == data.class_names() and len(ds.images) == 8
  assert list(ds.labels) == [data[i]['label'] for i in range(8)]
  m = cls.evaluate_classification(encoder, ds)
  assert 0 <= m['top1'] <= m['top5'] <= 100 and m['num_classes'] == 8


def test_report_json_and_markdown(tmp_path):
  results = {'retrieval': {'coco_val2017': {'i2t_R@1': np.float32(51.25), 'num_images': 5000}},
             'classification': {'imagenet_val': {'top1': 70.123}}}
  json_path, md_path = report.write_results(results, str(tmp_path / 'out'))
  with open(json_path) as f:
    assert json.load(f) == {'retrieval': {'coco_val2017': {'i2t_R@1': 51.25, 'num_images': 5000}},
                            'classification': {'imagenet_val': {'top1': 70.123}}}
  lines = open(md_path).read().splitlines()
  assert lines[0] == '| task | dataset | metric | value |'
  assert lines[2:] == ['| retrieval | coco_val2017 | i2t_R@1 | 51.25 |',
                       '| retrieval | coco_val2017 | num_images | 5000 |',
                       '| classification | imagenet_val | top1 | 70.12 |']
