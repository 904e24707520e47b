"""The demo end to end (a few steps, COSMOS and the CLIP baseline) and its chance levels."""

import json
import os

import numpy as np
import pytest

from cosmos_jax import demo, demo_report

from test_loop import SMALL_TOWERS

SMALL = ['--config.batch_size=8', '--config.data.synthetic.num_train=64',
         '--config.data.synthetic.num_val=16', '--config.eval.batch_size=8', *SMALL_TOWERS]


def test_chance_levels_hand_worked():
  # Two shapes (k = 3 classes with background) over 10 pixels: counts 6, 4, 0.
  masks = [np.array([[0, 0, 0], [0, 1, 1]]), np.array([[0, 0], [1, 1]])]
  chance = demo.chance_levels(num_val=50, image_size=3, num_shapes=2, masks=masks)
  iou = [(6 / 3) / (6 + 10 / 3 - 6 / 3), (4 / 3) / (4 + 10 / 3 - 4 / 3), 0.0]
  assert chance['mIoU'] == pytest.approx(100 * np.mean(iou))
  assert chance['t2i_R@1'] == pytest.approx(2.0) and chance['i2t_R@5'] == pytest.approx(10.0)
  assert chance['top1'] == pytest.approx(50.0) and chance['top5'] == pytest.approx(100.0)
  # All background: class 0 has IoU 6/10, class 1 has 0, class 2 (absent) does not count.
  assert chance['mIoU_all_background'] == pytest.approx(100 * 0.6 / 2)


def test_chance_miou_matches_simulated_random_guessing():
  rng = np.random.default_rng(0)
  masks = [rng.choice(4, size=(40, 40), p=[0.7, 0.2, 0.1, 0.0]) for _ in range(20)]
  from cosmos_jax.eval.segmentation import miou
  guesses = [rng.integers(0, 4, m.shape) for m in masks]
  simulated = miou(guesses, masks, num_classes=4)['mIoU']
  chance = demo.chance_levels(20, 40, 3, masks)
  assert chance['mIoU'] == pytest.approx(simulated, abs=0.3)
  background = miou([np.zeros_like(m) for m in masks], masks, num_classes=4)['mIoU']
  assert chance['mIoU_all_background'] == pytest.approx(background)


def test_table_mean_and_spread_hand_worked():
  runs = lambda *v: [{'retrieval': {'synthetic': {'t2i_R@1': x}}} for x in v]
  groups = [('COSMOS', runs(10.0, 12.0, 14.0)), ('CLIP', runs(5.0, 5.0, 8.0))]
  header, rows = demo_report.table_cells(groups, {'t2i_R@1': 0.25})
  assert header == ['metric', 'COSMOS', 'CLIP', 'COSMOS - CLIP', 'chance']
  row = next(r for r in rows if r[0] == 'retrieval text->image R@1')
  # means 12 and 6; sample standard deviations sqrt(8/2) = 2 and sqrt(6/2) = 1.73
  assert row == ['retrieval text->image R@1', '12.0 ± 2.0', '6.0 ± 1.7', '+6.0', '0.25']
  missing = next(r for r in rows if r[0] == 'shape classification top-1')
  assert missing[1:4] == ['', '', '']   # a metric no run has stays empty, not zero


# Slow (about 4 min on 2 loaded cores, four 1-step trainings): the only end-to-end check that
# `make demo-compare` trains every seed of both methods, reuses them and writes summary.png.
@pytest.mark.slow
def test_demo_compare_trains_both_and_reports(tmp_path):
  report = demo.run_demo(str(tmp_path), compare=True, steps=1, overrides=SMALL, seeds=(0, 1))
  assert '| metric | COSMOS | CLIP | COSMOS - CLIP | chance |' in report
  assert '| retrieval text->image R@1 |' in report and 'reused' not in report
  assert 'over 2 seeds' in report and ' ± ' in report
  assert 'every pixel labelled background scores ' in report
  for name, tree in (('cosmos', 'teacher'), ('clip', 'student')):
    for run in (tmp_path / name, tmp_path / f'{name}_seed1'):
      assert (run / 'plots' / 'curves.png').is_file()
      out = run / 'eval' / 'step_1' / tree
      assert (out / 'results.json').is_file() and (out / 'retrieval_synthetic_val.png').is_file()
      assert any(f.endswith('.png') for f in os.listdir(out / 'overlays_synthetic'))
    assert str(tmp_path / name / 'eval' / 'step_1' / tree / 'overlays_synthetic') in report
  assert (tmp_path / 'summary.png').is_file()
  assert json.loads((tmp_path / 'cosmos_seed1' / 'config.json').read_text())['seed'] == 1
  # A second call reuses the finished runs and prints the same table.
  again = demo.run_demo(str(tmp_path), compare=True, steps=1, overrides=SMALL, seeds=(0, 1))
  assert again.count('reused a finished run') == 4
  table = lambda text: [l for l in text.splitlines() if l.startswith('|')]
  assert table(again) == table(report)
