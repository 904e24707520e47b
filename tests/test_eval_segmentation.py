"""Zero-shot segmentation (spec 5.4): mIoU, window grid, resizes, post-processing, readers."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cosmos_jax import models
from cosmos_jax.data.synthetic import SyntheticConfig
from cosmos_jax.eval import seg_datasets as D
from cosmos_jax.eval import segmentation as S

TEMPLATES = ['a photo of a {}.', 'a rendering of the {}.']


@pytest.fixture(scope='module')
def tiny():
  config = models.get_variant('tiny')  # patch 8, image 32
  return config, models.init_params(config, jax.random.PRNGKey(0))


# --- mIoU ---


def test_miou_ignore_and_dataset_accumulation():
  gt1 = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
  pr1 = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
  # Kept (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,2); class 3 never appears.
  # c0: inter 1, pred 2, gt 2 -> 1/3;  c1: inter 2, pred 3, gt 3 -> 2/4;  c2: 1/3.
  r = S.miou([pr1], [gt1], num_classes=4)
  assert r['mIoU'] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 3) / 3)
  assert np.isnan(r['IoU'][3])
  assert r['aAcc'] == pytest.approx(100 * 4 / 7)
  assert r['mAcc'] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
  # A second image adds (gt 1, pred 0): c0 -> 1/(3+2-1) = 1/4, c1 -> 2/(3+4-2) = 2/5, c2 1/3.
  # Sums over the dataset, not a mean of per-image scores.
  r = S.miou([pr1, np.array([[0, 1]])], [gt1, np.array([[1, 255]])], num_classes=4)
  assert r['mIoU'] == pytest.approx(100 * (1 / 4 + 2 / 5 + 1 / 3) / 3)


def test_miou_reduce_zero_label():
  gt = np.array([[0, 1, 2], [3, 255, 1]], np.uint8)
  np.testing.assert_array_equal(S.reduce_labels(gt), [[255, 0, 1], [2, 255, 0]])
  pred = np.array([[0, 0, 1], [2, 1, 0]])
  # Kept (gt, pred): (0,0) (1,1) (2,2) (0,0) -> every class perfect.
  assert S.miou([pred], [gt], 3, reduce_zero_label=True)['mIoU'] == pytest.approx(100)
  pred = np.array([[0, 0, 1], [2, 1, 1]])
  # (0,0) (1,1) (2,2) (0,1): c0 1/(1+2-1), c1 1/(2+1-1), c2 1/1 -> (1/2 + 1/2 + 1) / 3.
  assert S.miou([pred], [gt], 3, reduce_zero_label=True)['mIoU'] == pytest.approx(100 * 2 / 3)


# --- geometry ---


@pytest.mark.parametrize('h, w, ys, xs', [
    # grids = max(H - 224 + 111, 0) // 112 + 1; start = max(min(i*112 + 224, H) - 224, 0)
    (300, 225, [0, 76], [0, 1]),            # 187//112+1 = 2; 112//112+1 = 2
    (224, 224, [0], [0]),                   # 111//112+1 = 1
    (225, 449, [0, 1], [0, 112, 224, 225]),  # 336//112+1 = 4, the last snapped to 449-224
    (100, 500, [0], [0, 112, 224, 276]),    # H < crop: one window of the whole height
])
def test_window_grid(h, w, ys, xs):
  assert S.window_starts(h, 224, 112) == ys
  assert S.window_starts(w, 224, 112) == xs
  windows = S.slide_windows(h, w, 224, 112)
  assert windows == [(y, min(y + 224, h), x, min(x + 224, w)) for y in ys for x in xs]
  count = np.zeros((h, w), int)
  for y1, y2, x1, x2 in windows:
    assert (y2 - y1, x2 - x1) == (min(224, h), min(224, w))
    count[y1:y2, x1:x2] += 1
  assert count.min() >= 1


@pytest.mark.parametrize('hw, short, out', [
    ((375, 500), 336, (336, 448)),     # f = min(2048/500, 336/375) = 0.896
    ((500, 375), 336, (448, 336)),
    ((512, 683), 336, (336, 448)),     # 683 * 0.65625 = 448.22
    ((480, 640), 448, (448, 597)),     # 640 * 448/480 = 597.33
    ((1024, 2048), 560, (560, 1120)),  # f = min(1, 0.546875)
    ((100, 5000), 336, (41, 2048)),    # the long side caps: f = 0.4096, 40.96 + 0.5 -> 41
    ((336, 448), 336, (336, 448)),
])
def test_rescale_size(hw, short, out):
  assert D.rescale_size(*hw, short) == out


def test_resize_linear_hand_values():
  # 2 -> 4 columns, scale 0.5: src x = (dx + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25;
  # clamped ends, weights (1536, 512) and (512, 1536) / 2048: 0, 63.75, 191.25, 255.
  row = np.array([[0, 255]], np.uint8)
  np.testing.assert_array_equal(D.resize_linear(row, (1, 4)), [[0, 64, 191, 255]])
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(D.resize_linear(img, (6, 8)), img)
  # An exact 2x shrink is the 2x2 mean, (a + b + c + d + 2) >> 2 (OpenCV's INTER_AREA path).
  blocks = img.astype(int).reshape(3, 2, 4, 2, 3).sum((1, 3))
  np.testing.assert_array_equal(D.resize_linear(img, (3, 4)), (blocks + 2) >> 2)
  const = np.full((7, 9, 3), 77, np.uint8)
  assert (D.resize_linear(const, (12, 5)) == 77).all()


def test_resize_linear_close_to_float_bilinear():
  img = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
  for size in [(20, 29), (50, 71), (37, 90)]:
    ref = np.einsum('ah,hwc,bw->abc', S.bilinear_matrix(37, size[0]), img.astype(float),
                    S.bilinear_matrix(53, size[1]), optimize=True)
    assert np.abs(D.resize_linear(img, size) - ref).max() <= 1.0


def torch_bilinear(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
  """torch interpolate(bilinear, align_corners=False), written out per output pixel:
  src = max((dst + 0.5) * in / out - 0.5, 0); i0 = floor(src); i1 = min(i0 + 1, in - 1);
  out = (1 - ly)((1 - lx) x[y0, x0] + lx x[y0, x1]) + ly((1 - lx) x[y1, x0] + lx x[y1, x1])."""
  c, h, w = x.shape
  out = np.zeros((c, oh, ow))
  for oy in range(oh):
    sy = max((oy + 0.5) * h / oh - 0.5, 0.0)
    y0 = int(sy)
    y1, ly = min(y0 + 1, h - 1), sy - y0
    for ox in range(ow):
      sx = max((ox + 0.5) * w / ow - 0.5, 0.0)
      x0 = int(sx)
      x1, lx = min(x0 + 1, w - 1), sx - x0
      out[:, oy, ox] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                        + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return out


@pytest.mark.parametrize('shape, out', [((3, 4, 4), (32, 32)), ((2, 3, 4), (21, 30)),
                                        ((2, 37, 23), (20, 9))])
def test_bilinear_matrix_matches_torch_formula(shape, out):
  x = np.random.default_rng(2).normal(size=shape)
  ours = np.einsum('ah,chw,bw->cab', S.bilinear_matrix(shape[1], out[0]), x,
                   S.bilinear_matrix(shape[2], out[1]))
  np.testing.assert_allclose(ours, torch_bilinear(x, *out), atol=1e-6)
  if out[0] >= shape[1]:  # upsampling: jax.image.resize without antialias agrees as well
    jx = jax.image.resize(jnp.asarray(x, jnp.float32), (shape[0],) + out, 'bilinear',
                          antialias=False)
    np.testing.assert_allclose(np.asarray(jx), ours, atol=1e-5)


# --- post-processing ---


def test_postprocess_synonyms_and_thresholds():
  # 4 queries for 3 classes: background has two synonyms. With logit_scale 1 and
  # logits = log(p) the softmax gives back p. Pixels A, B, C, D (one row).
  p = np.array([[0.10, 0.25, 0.05, 0.60],   # background, synonym 1
                [0.30, 0.25, 0.05, 0.10],   # background, synonym 2
                [0.40, 0.30, 0.10, 0.20],   # class 1
                [0.20, 0.20, 0.80, 0.10]])  # class 2
  logits, idx = np.log(p)[:, None, :], [0, 0, 1, 2]
  run = lambda **kw: S.postprocess(logits, idx, logit_scale=1.0, **kw)[0].tolist()
  # Max over synonyms: B is class 1 (0.30 > max(0.25, 0.25)); a sum would say background.
  assert run() == [1, 1, 2, 0]
  # prob_thd 0.35: B's best prob 0.30 < 0.35 -> background.
  assert run(prob_thd=0.35) == [1, 0, 2, 0]
  # area_thd 0.4: argmax areas c1 = 2, c2 = 1 of 3; c2 is kept only if 1 > 1.2 -> its prob
  # becomes 0 and C falls to its next best class, c1 (0.10 > 0.05): not to background.
  assert run(area_thd=0.4) == [1, 1, 1, 0]
  assert run(area_thd=0.4, prob_thd=0.35) == [1, 0, 0, 0]
  # The area test is strict: two classes with 2 of 4 pixels each and area_thd 0.5 (2 > 2 is
  # false) are both dropped.
  q = np.log(np.array([[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3], [0.3, 0.3, 0.5, 0.5]]))
  assert S.postprocess(q[:, None], [0, 1, 2], 1.0, area_thd=0.5)[0].tolist() == [0, 0, 0, 0]
  assert S.postprocess(q[:, None], [0, 1, 2], 1.0, area_thd=0.49)[0].tolist() == [1, 1, 2, 2]


# --- the segmentor against a direct implementation ---


def direct_logits(config, params, seg, image, queries):
  """The reference's loop: windows one by one, canvas + count map, resize to the original."""
  h0, w0 = image.shape[:2]
  h, w = D.rescale_size(h0, w0, seg.short_side, seg.long_side)
  x = D.normalize(D.resize_linear(image, (h, w)))
  model, p = models.CLIP(config), config.vision.patch_size
  tokens = jax.jit(lambda c: model.apply({'params': params}, c, csa=True,
                                         method=models.CLIP.encode_image)[1]['tokens'])
  canvas, count = np.zeros((len(queries), h, w)), np.zeros((h, w))
  for y1, y2, x1, x2 in S.slide_windows(h, w, seg.crop, seg.stride):
    feats = np.asarray(tokens(x[None, y1:y2, x1:x2])[0], np.float64) @ np.asarray(
        params['visual']['proj'])
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    logits = (feats @ queries.T).T.reshape(len(queries), (y2 - y1) // p, (x2 - x1) // p)
    canvas[:, y1:y2, x1:x2] += torch_bilinear(logits, y2 - y1, x2 - x1)
    count[y1:y2, x1:x2] += 1
  return torch_bilinear(canvas / count, h0, w0)


def test_segmentor_matches_direct_implementation(tiny):
  config, params = tiny
  seg = S.SegConfig('test', short_side=40, crop=32, stride=16, logit_scale=50, prob_thd=0.1,
                    area_thd=0.1)
  lines = ['background, sky', 'cat', 'dog, puppy']
  segmentor = S.Segmentor(config, {'teacher': params, 'student': None}, lines, seg, TEMPLATES)
  queries = np.asarray(segmentor.queries, np.float64)
  rng = np.random.default_rng(3)
  # 30x45 -> 40x60: 2 x 3 windows; 20x70 -> 24x84: windows 24 high (< crop), grid 3 x 4.
  for shape, short in [((30, 45, 3), 40), ((20, 70, 3), 24)]:
    segmentor.seg = dataclasses.replace(seg, short_side=short)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = segmentor.logits(image)
    ref = direct_logits(config, params, segmentor.seg, image, queries)
    assert ours.shape == (5,) + shape[:2]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    pred = segmentor.predict(image)
    expect = S.postprocess(ref, [0, 0, 1, 2, 2], 50, 0.1, 0.1)
    assert pred.shape == shape[:2] and np.mean(pred == expect) > 0.99


# --- readers and the end-to-end evaluation ---


def write_voc(root, shapes=((30, 45), (36, 28))):
  rng = np.random.default_rng(4)
  for sub in ['JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation']:
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  ids = [f'2007_00000{i}' for i in range(len(shapes))]
  for i, (h, w) in zip(ids, shapes):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(root, 'JPEGImages', i + '.jpg'))
    mask = Image.fromarray(rng.choice([0, 1, 15, 255], (h, w)).astype(np.uint8), mode='P')
    mask.putpalette(D.palette().ravel().tolist())
    mask.save(os.path.join(root, 'SegmentationClass', i + '.png'))
  with open(os.path.join(root, 'ImageSets/Segmentation/val.txt'), 'w') as f:
    f.write('\n'.join(ids) + '\n')
  return ids


def test_voc_end_to_end_with_overlays(tiny, tmp_path):
  config, params = tiny
  root = str(tmp_path / 'VOC2012')
  ids = write_voc(root)
  data = D.voc(root)
  assert (data.name, len(data), len(data.class_lines())) == ('voc21', 2, 21)
  key, image, label = data[0]
  assert key == ids[0] and image.shape == (30, 45, 3) and image.dtype == np.uint8
  assert set(np.unique(label)) <= {0, 1, 15, 255}  # palette indices, not colours
  seg = dataclasses.replace(S.SEG_CONFIGS['voc21'], short_side=40, crop=32, stride=16)
  out_dir = str(tmp_path / 'overlays')
  r = S.evaluate_segmentation(config, params, data, seg, TEMPLATES, progress=False,
                              overlay_dir=out_dir, num_overlays=4)
  assert r['num_images'] == 2 and r['dataset'] == 'voc21'
  assert 0 <= r['mIoU'] <= 100 and len(r['IoU']) == 21
  assert list(r['IoU'])[:2] == ['background', 'aeroplane']
  for i, (h, w) in zip(ids, [(30, 45), (36, 28)]):
    with Image.open(os.path.join(out_dir, i + '.png')) as im:
      k = -(-256 // min(h, w))   # panels enlarged by whole pixels to >= 256 px (overlays.py)
      assert im.size[0] == 3 * w * k + 2 * 8 and im.size[1] > h * k


def test_reader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    D.voc(str(tmp_path / 'nowhere'))
  root = str(tmp_path / 'VOC2012')
  ids = write_voc(root)
  os.remove(os.path.join(root, 'SegmentationClass', ids[1] + '.png'))
  with pytest.raises(FileNotFoundError, match=ids[1] + '.png'):
    D.voc(root)
  os.rename(os.path.join(root, 'JPEGImages'), os.path.join(root, 'images'))
  with pytest.raises(FileNotFoundError, match='JPEGImages'):
    D.voc(root)
  ade = tmp_path / 'ade'
  os.makedirs(ade / 'images/validation')
  os.makedirs(ade / 'annotations/validation')
  Image.new('RGB', (4, 4)).save(ade / 'images/validation/a.jpg')
  with pytest.raises(FileNotFoundError, match='a.png'):
    D.ade20k(str(ade))
  Image.new('L', (5, 4)).save(ade / 'annotations/validation/a.png')
  with pytest.raises(ValueError, match='a.jpg'):
    D.ade20k(str(ade))[0]


def test_class_files_and_synthetic():
  counts = {'voc20': (20, 30), 'voc21': (21, 56), 'context59': (59, 59),
            'context60': (60, 60), 'ade20k': (150, 150), 'cityscapes': (19, 19),
            'coco_stuff164k': (171, 171), 'coco_object': (81, 113)}
  files = {'voc20': 'cls_voc20.txt', 'voc21': 'cls_voc21.txt', 'context59': 'cls_context59.txt',
           'context60': 'cls_context60.txt', 'ade20k': 'cls_ade20k.txt',
           'cityscapes': 'cls_city_scapes.txt', 'coco_stuff164k': 'cls_coco_stuff.txt',
           'coco_object': 'cls_coco_object.txt'}
  assert set(counts) == set(D.READERS) == set(S.SEG_CONFIGS) - {'synthetic'}
  for name, (classes, queries) in counts.items():
    lines = D.read_class_lines(files[name])
    assert (len(lines), len(D.split_synonyms(lines)[0])) == (classes, queries), name
  assert D.read_class_lines('cls_voc21.txt')[0].startswith('sky, wall, tree')
  data = D.SyntheticSeg(SyntheticConfig(image_size=32, num_val=2))
  key, image, mask = data[1]
  assert len(data) == 2 and image.shape == (32, 32, 3) and mask.shape == (32, 32)
  assert data.class_lines() == data.data.mask_class_names()


def test_select_params():
  t, s = {'visual': 't'}, {'visual': 's'}
  assert S.select_params({'student': s, 'teacher': t}) is t
  assert S.select_params({'params': s, 'teacher_params': t, 'step': 0}) is t
  assert S.select_params({'params': s}) is s
  assert S.select_params({'student': s, 'teacher': t}, 'student') is s


# (reader name, image path, mask path) of each standard layout, relative to its root.
LAYOUTS = [
    ('voc20', 'JPEGImages/{k}.jpg', 'SegmentationClass/{k}.png',
     ('ImageSets/Segmentation/val.txt',)),
    ('voc21', 'JPEGImages/{k}.jpg', 'SegmentationClass/{k}.png',
     ('ImageSets/Segmentation/val.txt',)),
    ('context59', 'JPEGImages/{k}.jpg', 'SegmentationClassContext/{k}.png',
     ('ImageSets/SegmentationContext/val.txt',)),
    ('context60', 'JPEGImages/{k}.jpg', 'SegmentationClassContext/{k}.png',
     ('ImageSets/SegmentationContext/val.txt',)),
    ('ade20k', 'images/validation/{k}.jpg', 'annotations/validation/{k}.png', ()),
    ('cityscapes', 'leftImg8bit/val/city/{k}_leftImg8bit.png',
     'gtFine/val/city/{k}_gtFine_labelTrainIds.png', ()),
    ('coco_stuff164k', 'images/val2017/{k}.jpg', 'annotations/val2017/{k}_labelTrainIds.png', ()),
    ('coco_object', 'images/val2017/{k}.jpg', 'annotations/val2017/{k}_instanceTrainIds.png', ()),
]
CLASS_COUNTS = {'voc20': 20, 'voc21': 21, 'context59': 59, 'context60': 60, 'ade20k': 150,
                'cityscapes': 19, 'coco_stuff164k': 171, 'coco_object': 81}


@pytest.mark.parametrize('name,image_tpl,mask_tpl,split_files', LAYOUTS)
def test_every_reader_reads_its_layout(tmp_path, name, image_tpl, mask_tpl, split_files):
  from PIL import Image
  from cosmos_jax.eval import seg_datasets
  keys = ['a_001', 'b_002']
  rng = np.random.default_rng(0)
  labels = {}
  for k in keys:
    image_path, mask_path = tmp_path / image_tpl.format(k=k), tmp_path / mask_tpl.format(k=k)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(image_path)
    labels[k] = rng.integers(0, 5, (20, 30), dtype=np.uint8)
    Image.fromarray(labels[k]).save(mask_path)
  for split in split_files:
    (tmp_path / split).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / split).write_text('\n'.join(keys) + '\n')
  ds = seg_datasets.get_dataset(name, str(tmp_path))
  assert len(ds) == 2 and len(ds.class_lines()) == CLASS_COUNTS[name]
  for i, k in enumerate(keys):
    key, image, label = ds[i]
    assert k in key and image.shape == (20, 30, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(label, labels[k])
  # An image without its mask is an error naming the file.
  os.remove(tmp_path / mask_tpl.format(k=keys[1]))
  with pytest.raises(FileNotFoundError, match='has no mask'):
    seg_datasets.get_dataset(name, str(tmp_path))


def test_windows_sharded_over_a_mesh_give_the_same_prediction(tiny):
  """Windows split over ('data', 'fsdp') of an 8-device mesh equal the one-device result."""
  from cosmos_jax.train import partition
  cfg, params = tiny
  seg_cfg = dataclasses.replace(S.SEG_CONFIGS['synthetic'], short_side=40, crop=32, stride=16)
  lines = ['background', 'circle', 'square']
  image = np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8)
  one = S.Segmentor(cfg, params, lines, seg_cfg, ['a photo of a {}.'], which='params')
  many = S.Segmentor(cfg, params, lines, seg_cfg, ['a photo of a {}.'], which='params',
                     mesh=partition.make_mesh((4, 2, 1)))
  np.testing.assert_allclose(many.logits(image), one.logits(image), atol=1e-5)
