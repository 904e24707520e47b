"""Caption sentence pools and COSMOS text cropping (spec 2.2).

A sample's caption metadata becomes a pool of sentences; each training sample then gets
``num_global`` global captions (1..5 sentences joined by '. ') and ``num_local`` local
captions (one sentence each), drawn with the official sampling rule and in the official
order of RNG calls, so that a ``random.Random`` seeded like Python's global ``random``
gives the same captions as the PyTorch code.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Mapping, Sequence

# Sentence boundaries of FLAIR's presplit and COSMOS's on-the-fly PixelProse split.
_SPLIT_RE = re.compile(r'\n|</s>|[.]')

# DreamLIP json keys, in the order the official code concatenates them (short before long).
DREAMLIP_FIELDS = (
    'raw_caption',
    'shortIB_captions', 'shortSV_captions', 'shortLLA_captions',
    'longIB_captions', 'longSV_captions', 'longLLA_captions',
)
PIXELPROSE_FIELDS = ('original_caption', 'caption')
PLAIN_FIELDS = ('caption', 'captions')
MODES = ('textcrop', 'textcrop_pixelprose')


class EmptyCaptionError(ValueError):
  """A sample has no usable caption text; the pipeline counts and skips it."""


def split_sentences(text: str) -> list[str]:
  """Splits on newlines, '</s>' and '.', strips each piece and drops empty ones."""
  return [s.strip() for s in _SPLIT_RE.split(text) if s.strip()]


def _as_sentences(value: Any) -> list[str]:
  """A field value as sentences: strings are split, lists are taken as presplit.

  List items are kept verbatim (as the official code does) except non-strings and
  blank strings, which presplit data never contains and which would only yield
  empty or untokenizable captions.
  """
  if value is None:
    return []
  if isinstance(value, str):
    return split_sentences(value)
  if isinstance(value, Sequence):
    return [v for v in value if isinstance(v, str) and v.strip()]
  raise EmptyCaptionError(f'caption field of unsupported type {type(value).__name__}')


def _plain_pool(meta: Mapping[str, Any]) -> list[str]:
  pool = _as_sentences(meta.get('caption'))
  captions = meta.get('captions')
  if isinstance(captions, str):
    captions = [captions]
  for c in captions or ():
    if isinstance(c, str):
      pool += split_sentences(c)
  return pool


def sentence_pool(meta: Mapping[str, Any], mode: str = 'textcrop') -> list[str]:
  """The list of sentences that text cropping samples from.

  Args:
    meta: the sample's json. DreamLIP keys (``DREAMLIP_FIELDS``) for 'textcrop';
      ``original_caption`` + ``caption`` for 'textcrop_pixelprose'; a plain ``caption``
      string or ``captions`` list (csv/jsonl sources) is accepted by both modes.
    mode: 'textcrop' or 'textcrop_pixelprose'.

  Raises:
    EmptyCaptionError: no known field is present, or all present fields are empty.
  """
  if mode not in MODES:
    raise ValueError(f'unknown caption mode {mode!r}; expected one of {MODES}')
  if mode == 'textcrop':
    present = [k for k in DREAMLIP_FIELDS if meta.get(k) is not None]
    if present:
      pool = [s for k in present for s in _as_sentences(meta[k])]
    else:
      present = [k for k in PLAIN_FIELDS if meta.get(k) is not None]
      pool = _plain_pool(meta)
    expected = DREAMLIP_FIELDS + PLAIN_FIELDS
  else:
    original = meta.get('original_caption')
    present = [k for k in PIXELPROSE_FIELDS + PLAIN_FIELDS[1:] if meta.get(k) is not None]
    # The original (alt-text) caption is one pool entry, never split.
    pool = [original] if isinstance(original, str) and original.strip() else []
    pool += _plain_pool(meta)
    expected = PIXELPROSE_FIELDS + PLAIN_FIELDS[1:]
  if not present:
    raise EmptyCaptionError(
        f'no caption field for mode {mode!r}: expected one of {list(expected)}, '
        f'got keys {sorted(meta)}')
  if not pool:
    raise EmptyCaptionError(f'caption fields {present} hold no sentence (mode {mode!r})')
  return pool


def sample_without_replacement(pool: Sequence[str], n: int,
                               rng: random.Random) -> list[str]:
  """``n`` sentences, distinct while the pool allows (the official rule).

  ``rng.sample(pool, n)`` when ``len(pool) >= n``; otherwise ``n // len(pool)`` copies of
  the whole pool, in pool order (not shuffled), then ``rng.sample(pool, n % len(pool))``.
  """
  if not pool:
    raise EmptyCaptionError('cannot sample from an empty sentence pool')
  pool = list(pool)
  if len(pool) >= n:
    return rng.sample(pool, n)
  return (n // len(pool)) * pool + rng.sample(pool, n % len(pool))


@dataclasses.dataclass(frozen=True)
class TextCropConfig:
  """Text cropping hyper-parameters (``--num-sampled-captions 8`` = 2 global + 6 local)."""
  num_global: int = 2
  num_local: int = 6
  max_global_sentences: int = 5
  min_global_sentences: int = 1
  joiner: str = '. '

  def __post_init__(self):
    if not 1 <= self.min_global_sentences <= self.max_global_sentences:
      raise ValueError(f'need 1 <= min_global_sentences <= max_global_sentences, got '
                       f'{self.min_global_sentences}, {self.max_global_sentences}')
    if self.num_global < 1 or self.num_local < 0:
      raise ValueError(f'bad caption counts {self.num_global}, {self.num_local}')

  @property
  def num_captions(self) -> int:
    return self.num_global + self.num_local


def crop_captions(pool: Sequence[str], rng: random.Random,
                  cfg: TextCropConfig = TextCropConfig()) -> list[str]:
  """[global_1, .., global_G, local_1, .., local_L] from a sentence pool.

  RNG call order as in the official code: all global sentence counts first
  (``randint``, inclusive), then each global caption's sample, then the locals' sample.
  Global and local draws are independent, so a local sentence may recur in a global.
  """
  counts = [rng.randint(cfg.min_global_sentences, cfg.max_global_sentences)
            for _ in range(cfg.num_global)]
  globals_ = [cfg.joiner.join(sample_without_replacement(pool, n, rng)) for n in counts]
  return globals_ + sample_without_replacement(pool, cfg.num_local, rng)
