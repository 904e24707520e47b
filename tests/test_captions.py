"""Sentence pools and text cropping (spec 2.2)."""

import collections
import random

import pytest

from cosmos_jax.data import captions as C

DREAMLIP = {
    'raw_caption': ['raw one'],
    'shortIB_captions': ['sib'],
    'longIB_captions': ['lib a', 'lib b'],
    'shortSV_captions': ['ssv'],
    'longSV_captions': ['lsv a', 'lsv b'],
    'shortLLA_captions': ['slla'],
    'longLLA_captions': ['llla a', 'llla b'],
    'url': 'http://x',
}


@pytest.mark.parametrize('text, expected', [
    ('A dog. A cat.', ['A dog', 'A cat']),
    ('first</s>second</s>', ['first', 'second']),
    ('line one\nline two.\n\n', ['line one', 'line two']),
    ('  a  .. b ...  \n </s> c', ['a', 'b', 'c']),
    ('no boundary here', ['no boundary here']),
    ('3.5 inches', ['3', '5 inches']),  # the regex splits decimals too, as the reference
    ('', []),
    (' . \n </s> ', []),
])
def test_split_sentences(text, expected):
  assert C.split_sentences(text) == expected


def test_dreamlip_pool_order():
  assert C.sentence_pool(DREAMLIP) == [
      'raw one', 'sib', 'ssv', 'slla', 'lib a', 'lib b', 'lsv a', 'lsv b', 'llla a',
      'llla b']


def test_dreamlip_strings_and_missing_fields():
  meta = {'raw_caption': 'A red car. Parked', 'longSV_captions': 'x\ny</s>z.',
          'shortIB_captions': None}
  assert C.sentence_pool(meta) == ['A red car', 'Parked', 'x', 'y', 'z']


def test_plain_caption_sources():
  assert C.sentence_pool({'caption': 'a b. c d.'}) == ['a b', 'c d']
  assert C.sentence_pool({'captions': ['a. b', 'c']}) == ['a', 'b', 'c']


def test_pixelprose_pool():
  meta = {'original_caption': 'Alt text. With a dot', 'caption': 'This image shows x.\ny. z'}
  assert C.sentence_pool(meta, 'textcrop_pixelprose') == [
      'Alt text. With a dot', 'This image shows x', 'y', 'z']
  assert C.sentence_pool({'caption': 'a. b'}, 'textcrop_pixelprose') == ['a', 'b']
  assert C.sentence_pool({'original_caption': 'alt', 'caption': ''},
                         'textcrop_pixelprose') == ['alt']


@pytest.mark.parametrize('meta, mode, match', [
    ({'url': 'x', 'key': '1'}, 'textcrop', 'no caption field'),
    ({'raw_caption': [], 'longIB_captions': ['', ' ']}, 'textcrop', 'hold no sentence'),
    ({'caption': ' . '}, 'textcrop', 'hold no sentence'),
    ({'original_caption': '', 'caption': '.'}, 'textcrop_pixelprose', 'hold no sentence'),
    ({'raw_caption': ['a']}, 'textcrop_pixelprose', 'no caption field'),
])
def test_empty_caption_error(meta, mode, match):
  with pytest.raises(C.EmptyCaptionError, match=match):
    C.sentence_pool(meta, mode)
  assert issubclass(C.EmptyCaptionError, ValueError)


def test_unknown_mode():
  with pytest.raises(ValueError, match='unknown caption mode'):
    C.sentence_pool(DREAMLIP, 'random')


def test_empty_pool_sampling_raises():
  with pytest.raises(C.EmptyCaptionError):
    C.sample_without_replacement([], 3, random.Random(0))


@pytest.mark.parametrize('pool, counts', [
    (['a'], {'a': 6}),
    (['a', 'b'], {'a': 3, 'b': 3}),
    (['a', 'b', 'c'], {'a': 2, 'b': 2, 'c': 2}),
    (['a', 'b', 'c', 'd'], None),
])
def test_small_pool_rule(pool, counts):
  rng = random.Random(1)
  for _ in range(50):
    out = C.sample_without_replacement(pool, 6, rng)
    assert len(out) == 6
    if counts is not None:
      assert collections.Counter(out) == counts
      assert out == pool * (6 // len(pool))  # full copies in pool order, no remainder
    else:  # 4 sentences: one full copy in pool order, then 2 distinct random ones
      assert out[:4] == pool and len(set(out[4:])) == 2


def test_small_pool_remainder_matches_rng_sample():
  pool = ['a', 'b', 'c', 'd', 'e']
  out = C.sample_without_replacement(pool, 7, random.Random(3))
  assert out == pool + random.Random(3).sample(pool, 2)


def test_reference_rng_call_order():
  # randint for every global first, then one sample per global, then the locals.
  pool = [f's{i}' for i in range(20)]
  for seed in range(5):
    got = C.crop_captions(pool, random.Random(seed), C.TextCropConfig())
    r = random.Random(seed)
    n1, n2 = r.randint(1, 5), r.randint(1, 5)
    want = ['. '.join(r.sample(pool, n1)), '. '.join(r.sample(pool, n2))] + r.sample(pool, 6)
    assert got == want


def test_global_sentence_count_distribution():
  pool = [f'sentence{i}' for i in range(30)]
  rng = random.Random(0)
  cfg = C.TextCropConfig()
  hist = collections.Counter()
  draws = 5000
  for _ in range(draws // 2):
    out = C.crop_captions(pool, rng, cfg)
    assert len(out) == 8
    for g in out[:2]:
      parts = g.split('. ')
      assert len(set(parts)) == len(parts)  # no repeat within a caption
      hist[len(parts)] += 1
    assert all(s in pool for s in out[2:])
    assert len(set(out[2:])) == 6
  assert sorted(hist) == [1, 2, 3, 4, 5]
  expected = draws / 5
  chi2 = sum((hist[k] - expected) ** 2 / expected for k in range(1, 6))
  assert chi2 < 18.5  # chi-square, 4 dof, p = 0.001
  assert all(abs(hist[k] / draws - 0.2) < 0.02 for k in range(1, 6))


def test_locals_cover_pool_uniformly():
  pool = [f's{i}' for i in range(10)]
  rng = random.Random(5)
  hist = collections.Counter()
  for _ in range(2000):
    hist.update(C.crop_captions(pool, rng)[2:])
  assert all(abs(hist[s] / 12000 - 0.1) < 0.01 for s in pool)


def test_determinism_and_config():
  pool = C.sentence_pool(DREAMLIP)
  a = C.crop_captions(pool, random.Random(42))
  b = C.crop_captions(pool, random.Random(42))
  c = C.crop_captions(pool, random.Random(43))
  assert a == b and a != c
  cfg = C.TextCropConfig(num_global=3, num_local=2, max_global_sentences=2, joiner=' ')
  out = C.crop_captions(pool, random.Random(0), cfg)
  assert len(out) == cfg.num_captions == 5
  assert all(len(g.split(' ')) <= 4 for g in out[:3])
  with pytest.raises(ValueError):
    C.TextCropConfig(min_global_sentences=3, max_global_sentences=2)
