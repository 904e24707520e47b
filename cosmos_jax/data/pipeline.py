"""Training input pipeline on grain: decode, multi-crop, text crop, host sharding, batches.

Per host, the samples are one random-access ``grain.MapDataset``:

  source -> random_map(decode_and_augment) -> shuffle -> repeat -> [shard_index::shard_count]

* ``random_map`` sits below ``shuffle`` and ``repeat``, so the index that seeds its
  generator is ``epoch * len(source) + record_index``: a record's crops and captions
  depend only on (seed, record, epoch), never on shuffling, sharding, workers or threads.
* ``shuffle`` draws a fresh permutation per epoch (grain folds the epoch into its seed).
* Host sharding strides over the shuffled stream of all epochs: every epoch's records are
  split among the hosts, disjoint and complete, and a host's share changes every epoch.
  Host epoch lengths differ by at most one when ``len(source) % shard_count != 0``.
* Bad records become ``Skip`` markers instead of being filtered out, so every stage emits
  exactly one element per index and the stream order is the dataset order, whatever
  ``worker_count`` and ``read_threads`` are. ``TrainIterator`` (main process) drops, counts
  and logs them, then stacks per-host batches.
* Samples lost before they became records (a shard cut short, against its ``sizes.json``)
  are named by the source when it opens, totalled in ``stats()`` and bounded by the same
  ``max_bad_fraction`` before the first batch.

Resume: the iterator state is the number of elements this host has consumed plus the skip
counters; ``set_state`` restarts grain at ``dataset[position:]``. This is exact (the
elements are a pure function of their index) and does not depend on the worker count.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import logging
import random
import re
from typing import Any

import grain
import numpy as np
from PIL import Image

from cosmos_jax import tokenizer
from cosmos_jax.data import augment, captions
from cosmos_jax.errors import RunError

STATE_VERSION = 1
_NUM_LAST_BAD = 20
_ADDRESS_RE = re.compile(r' at 0x[0-9a-fA-F]+')

log = logging.getLogger(__name__)


class TooManyBadSamplesError(RunError):
  """More than ``max_bad_fraction`` of the records seen so far had to be skipped."""


@dataclasses.dataclass(frozen=True)
class Skip:
  """Marks a record that could not be turned into a training example."""
  key: str
  reason: str


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything that determines the training stream (besides the source and the hosts)."""
  global_batch_size: int
  seed: int = 0
  num_epochs: int | None = None  # None: repeat forever
  shuffle: bool = True
  worker_count: int = 0  # grain worker processes for decode + augment; 0: in-process
  worker_buffer_size: int = 2  # examples buffered per worker
  read_threads: int = 4  # threads per process calling decode_and_augment
  read_buffer_size: int = 64
  text_mode: str = 'textcrop'
  context_length: int = tokenizer.CONTEXT_LENGTH
  multicrop: augment.MultiCropConfig = dataclasses.field(
      default_factory=augment.MultiCropConfig)
  textcrop: captions.TextCropConfig = dataclasses.field(
      default_factory=captions.TextCropConfig)
  max_bad_fraction: float = 0.01
  min_samples_before_check: int = 100
  drop_remainder: bool = True

  def __post_init__(self):
    if self.global_batch_size < 1:
      raise ValueError(f'global_batch_size must be positive, got {self.global_batch_size}')
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f'num_epochs must be None or positive, got {self.num_epochs}')
    if not 0.0 <= self.max_bad_fraction <= 1.0:
      raise ValueError(f'max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}')
    if self.worker_count < 0 or self.read_threads < 0:
      raise ValueError(f'worker_count ({self.worker_count}) and read_threads '
                       f'({self.read_threads}) must be >= 0')


def decode_image(data: bytes | np.ndarray) -> Image.Image:
  """Encoded bytes or a uint8 (H, W[, 3]) array -> fully decoded RGB PIL image."""
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim not in (2, 3):
      raise ValueError(f'image array must be uint8 (H, W[, C]), got {data.dtype} '
                       f'{data.shape}')
    image = Image.fromarray(data)
  else:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so that truncated files fail here
  if image.width < 1 or image.height < 1:
    raise ValueError(f'empty image {image.size}')
  return image.convert('RGB')


def decode_and_augment(record: dict[str, Any], rng: np.random.Generator,
                       cfg: PipelineConfig) -> dict[str, Any] | Skip:
  """One raw record -> {'global', 'local', 'text', 'key'}, or ``Skip`` on any failure."""
  key = str(record.get('key', '<no key>')) if isinstance(record, dict) else '<no key>'
  try:
    if record.get('error'):
      return Skip(key, f'unreadable record: {record["error"]}')
    image = decode_image(record['image'])
    pool = captions.sentence_pool(record['meta'], cfg.text_mode)
    # Python's random drives text cropping (as the official code); seed it from `rng`.
    texts = captions.crop_captions(pool, random.Random(int(rng.integers(2**63))),
                                   cfg.textcrop)
    text = tokenizer.tokenize(texts, cfg.context_length)
    glob, local = augment.multi_crop(image, rng, cfg.multicrop)
  except Exception as e:  # pylint: disable=broad-except
    # Any per-record failure is a skip; if it is systematic (a bug), the bad-fraction
    # bound stops the run and its message shows the reasons. Object addresses are
    # dropped so that reasons, which go into the iterator state, are deterministic.
    return Skip(key, _ADDRESS_RE.sub('', f'{type(e).__name__}: {e}'))
  return {'global': glob, 'local': local, 'text': text.astype(np.int32), 'key': key}


def collate(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks examples sample-major: global (b,2,G,G,3), local (b,6,L,L,3), text (b,8,T)."""
  return {
      'global': np.stack([e['global'] for e in examples]),
      'local': np.stack([e['local'] for e in examples]),
      'text': np.stack([e['text'] for e in examples]),
      'keys': np.array([e['key'] for e in examples]),
  }


def _derived_seed(seed: int, purpose: int) -> int:
  """Independent 32-bit seeds per use, so that seed s, epoch e+1 is not seed s+1, epoch e."""
  return int(np.random.SeedSequence([seed, purpose]).generate_state(1)[0])


def _location(source) -> str:
  location = getattr(source, 'location', None)
  return location() if callable(location) else repr(getattr(source, 'name', type(source).__name__))


def _problems(source) -> list[str]:
  problems = getattr(source, 'problems', None)
  return list(problems()) if callable(problems) else []


def _mark_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags, which only absl.app.run parses: without this,
  any program that is not an absl app (the CLI, a notebook, pytest) fails at its first batch
  with UnparsedFlagAccessError. The defaults are what we want."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def check_source_losses(source, cfg: PipelineConfig) -> dict[str, Any]:
  """Samples the source lost before they became records (a shard cut short, say), named.

  Returns the counters {'source_missing', 'source_bad_parts'}; raises TooManyBadSamplesError
  when the missing samples alone exceed ``max_bad_fraction`` of what the source should hold.
  """
  missing = int(getattr(source, 'missing_records', 0) or 0)
  problems = _problems(source)
  if problems:
    log.warning('data source %s: %d damaged part(s), %d samples missing (each named above)',
                getattr(source, 'name', '') or _location(source), len(problems), missing)
  expected = len(source) + missing
  if missing and missing > cfg.max_bad_fraction * expected:
    raise TooManyBadSamplesError(
        f'{missing} of the {expected} samples the source should hold are missing '
        f'({missing / expected:.2%} > max_bad_fraction {cfg.max_bad_fraction:.2%}): '
        + '; '.join(problems))
  return {'source_missing': missing, 'source_bad_parts': len(problems)}


def host_dataset(source, cfg: PipelineConfig, shard_index: int,
                 shard_count: int) -> grain.MapDataset:
  """This host's stream of examples and ``Skip`` markers, as a random-access dataset."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, {shard_count})')
  if len(source) < shard_count:
    raise ValueError(f'the source {_location(source)} has {len(source)} records, fewer than the '
                     f'{shard_count} hosts' + ''.join(f'; {p}' for p in _problems(source)))
  ds = grain.MapDataset.source(source).random_map(
      functools.partial(decode_and_augment, cfg=cfg), seed=_derived_seed(cfg.seed, 1))
  if cfg.shuffle:
    ds = ds.shuffle(seed=_derived_seed(cfg.seed, 2))
  ds = ds.repeat(cfg.num_epochs)
  # Striding the concatenated epochs (not each epoch) keeps the split disjoint and
  # complete per epoch also when len(source) is not a multiple of shard_count.
  return ds[shard_index::shard_count]


class TrainIterator(grain.DatasetIterator):
  """Drops and counts ``Skip`` markers, stacks per-host batches; checkpointable.

  State (JSON): {'version', 'position' (elements of this host's dataset consumed, skips
  included), 'seen', 'skipped', 'last_bad' ([[key, reason], ...]), and, checked on
  restore, 'shard_index', 'shard_count', 'seed', 'shuffle', 'num_records'}.
  """

  def __init__(self, dataset: grain.MapDataset, cfg: PipelineConfig, batch_size: int,
               shard_index: int, shard_count: int, num_records: int,
               source_losses: dict[str, int] | None = None):
    super().__init__()
    self._source_losses = dict(source_losses or {'source_missing': 0, 'source_bad_parts': 0})
    self._dataset = dataset
    self._cfg = cfg
    self._batch_size = batch_size
    self._shard = (shard_index, shard_count)
    self._num_records = num_records
    self._inner = None  # the grain iterator, built on first use
    self._position = 0
    self._seen = 0
    self._skipped = 0
    self._last_bad: collections.deque[tuple[str, str]] = collections.deque(
        maxlen=_NUM_LAST_BAD)

  def _build_inner(self) -> grain.DatasetIterator:
    cfg = self._cfg
    ds = self._dataset[self._position:] if self._position else self._dataset
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.read_buffer_size))
    if cfg.worker_count > 0:
      _mark_absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
    return iter(it)

  def _next_element(self) -> Any:
    if self._inner is None:
      self._inner = self._build_inner()
    element = next(self._inner)
    self._position += 1
    self._seen += 1
    if isinstance(element, Skip):
      self._skipped += 1
      self._last_bad.append((element.key, element.reason))
      log.warning('skipping bad sample %r: %s (%d of %d skipped)', element.key,
                  element.reason, self._skipped, self._seen)
    self._check_bad_fraction()
    return element

  def _check_bad_fraction(self) -> None:
    cfg = self._cfg
    if (self._seen >= cfg.min_samples_before_check
        and self._skipped > cfg.max_bad_fraction * self._seen):
      last = '\n'.join(f'  {k}: {r}' for k, r in self._last_bad)
      raise TooManyBadSamplesError(
          f'{self._skipped} of {self._seen} samples skipped as bad '
          f'({self._skipped / self._seen:.2%} > max_bad_fraction '
          f'{cfg.max_bad_fraction:.2%}); last bad keys:\n{last}')

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    examples = []
    while len(examples) < self._batch_size:
      try:
        element = self._next_element()
      except StopIteration:
        if examples and not self._cfg.drop_remainder:
          break
        raise
      if not isinstance(element, Skip):
        examples.append(element)
    return collate(examples)

  def stats(self) -> dict[str, Any]:
    """Counters of this host: records seen, skipped, the last bad (key, reason)s, and the
    source's own losses (samples missing from damaged shards, shared by all hosts)."""
    return {'position': self._position, 'seen': self._seen, 'skipped': self._skipped,
            'bad_fraction': self._skipped / max(self._seen, 1),
            'last_bad': [list(kr) for kr in self._last_bad], **self._source_losses}

  def get_state(self) -> dict[str, Any]:
    return {'version': STATE_VERSION, 'position': self._position, 'seen': self._seen,
            'skipped': self._skipped, 'last_bad': [list(kr) for kr in self._last_bad],
            **self._identity()}

  def _identity(self) -> dict[str, Any]:
    # What fixes the element at each position; num_epochs does not (it only cuts the
    # stream), so a resumed run may change it.
    return {'shard_index': self._shard[0], 'shard_count': self._shard[1],
            'seed': self._cfg.seed, 'shuffle': self._cfg.shuffle,
            'num_records': self._num_records}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('version') != STATE_VERSION:
      raise ValueError(f'data iterator state version {state.get("version")} is not '
                       f'{STATE_VERSION}')
    here = self._identity()
    saved = {k: state.get(k) for k in here}
    if saved != here:
      raise ValueError(f'the data iterator state was saved by a pipeline with {saved}, '
                       f'this one has {here}; an exact resume needs the same values')
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    self._position = int(state['position'])
    self._seen = int(state['seen'])
    self._skipped = int(state['skipped'])
    self._last_bad.clear()
    self._last_bad.extend((str(k), str(r)) for k, r in state['last_bad'])

  def close(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    super().close()

  def __str__(self) -> str:
    return (f'TrainIterator(batch_size={self._batch_size}, shard={self._shard}, '
            f'position={self._position})')


def make_train_iterator(source, cfg: PipelineConfig, *, shard_index: int | None = None,
                        shard_count: int | None = None) -> TrainIterator:
  """This host's iterator of training batches (see the module docstring).

  ``shard_index``/``shard_count`` default to ``jax.process_index()``/``process_count()``;
  explicit values simulate hosts. Each host gets global_batch_size // shard_count samples
  per batch.
  """
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (grain workers need no jax)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if cfg.global_batch_size % shard_count:
    raise ValueError(f'global_batch_size {cfg.global_batch_size} is not divisible by the '
                     f'number of hosts {shard_count}')
  dataset = host_dataset(source, cfg, shard_index, shard_count)
  losses = check_source_losses(source, cfg)
  return TrainIterator(dataset, cfg, cfg.global_batch_size // shard_count, shard_index,
                       shard_count, len(source), source_losses=losses)
