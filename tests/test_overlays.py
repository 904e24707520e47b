"""Segmentation overlays: nearest-neighbour enlargement, class colours, the legend."""

import numpy as np
import pytest
from PIL import Image

from cosmos_jax.eval import overlays
from cosmos_jax.eval.overlays import overlay_image, palette, save_overlay, upscale_factor


def test_palette_is_the_voc_colour_map():
  # The first VOC colours, as published with the PASCAL devkit.
  expected = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
              (0, 128, 128), (128, 128, 128), (64, 0, 0)]
  assert [tuple(int(v) for v in c) for c in palette()[:9]] == expected


@pytest.mark.parametrize('size, minimum, factor', [((64, 64), 256, 4), ((30, 50), 256, 9),
                                                   ((300, 400), 256, 1), ((64, 64), 257, 5)])
def test_upscale_factor_is_the_smallest_integer_reaching_the_minimum(size, minimum, factor):
  assert upscale_factor(*size, minimum) == factor
  assert min(size) * factor >= minimum > min(size) * (factor - 1) or factor == 1


def test_panels_are_nearest_neighbour_blocks_of_the_class_colours():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  label = rng.integers(0, 3, (16, 16))
  pred = (label + 1) % 3
  label[0, 0] = 255                                   # an ignored pixel is white
  out = np.asarray(overlay_image(image, label, pred, ['background', 'circle', 'square']))
  k = 16                                              # 256 / 16
  w = 16 * k
  top = overlays._TITLE_H
  panels = [out[top:top + w, i * (w + overlays._GAP):i * (w + overlays._GAP) + w]
            for i in range(3)]
  assert np.array_equal(panels[0], np.repeat(np.repeat(image, k, 0), k, 1))
  colours = palette()
  expected_gt = colours[np.clip(label, 0, 255)].copy()
  expected_gt[label == 255] = (255, 255, 255)
  assert np.array_equal(panels[1], np.repeat(np.repeat(expected_gt, k, 0), k, 1))
  assert np.array_equal(panels[2], np.repeat(np.repeat(colours[pred], k, 0), k, 1))
  legend = out[top + w:]
  for c in range(3):                                  # every class present has its swatch
    assert (legend == colours[c]).all(axis=-1).sum() >= (overlays._SWATCH - 1) ** 2


def test_legend_lists_only_classes_present(tmp_path):
  label = np.zeros((8, 8), np.int64)
  pred = np.zeros((8, 8), np.int64)
  pred[2:4, 2:4] = 5
  path = tmp_path / 'o.png'
  save_overlay(str(path), np.zeros((8, 8, 3), np.uint8), label, pred,
               class_names=[f'c{i}' for i in range(9)])
  legend = np.asarray(Image.open(path).convert('RGB'))[overlays._TITLE_H + 256:]
  colours = palette()
  assert (legend == colours[5]).all(axis=-1).any()
  assert not (legend == colours[3]).all(axis=-1).any()   # absent class: no swatch


def test_mismatched_shapes_are_an_error():
  with pytest.raises(ValueError, match='same height and width'):
    overlay_image(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), int), np.zeros((8, 9), int))
