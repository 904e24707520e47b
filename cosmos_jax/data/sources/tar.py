"""Webdataset tar shards (as img2dataset writes them) as a random-access record source.

A sample is the group of members sharing a key: ``<key>.jpg|png|jpeg|webp`` + ``<key>.json``
(+ optional ``<key>.mask.png``, ``<key>.txt``). The key is the member path up to the first dot of
its basename (webdataset's ``base_plus_ext``). The index (shard, offset, size per member) is built
once from the tar headers alone and kept in memory; data are read by offset at access.

Each shard's record count is checked against what an index lists for it (``accounting``).
"""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import re
import tarfile

import numpy as np
import tqdm

from cosmos_jax.data.sources.accounting import ShardReport, expected_counts
from cosmos_jax.data.sources.base import DataSourceError, Record, RecordSource, error_record

# Same priority as the reference's wds.rename(image='jpg;png;jpeg;webp').
IMAGE_EXTS = ('jpg', 'png', 'jpeg', 'webp')
_SLOTS = ('image', 'json', 'mask', 'txt')
_REMOTE = ('pipe:', 'http://', 'https://', 'gs://', 's3://', 'hf://')
_RANGE = re.compile(r'(-?\d+|[a-zA-Z])\.\.(-?\d+|[a-zA-Z])(?:\.\.(-?\d+))?')
_MEMBER = re.compile(r'^((?:.*/|)[^.]+)[.]([^/]*)$')  # webdataset base_plus_ext

log = logging.getLogger(__name__)


def _split_top_level(body: str) -> list[str]:
  parts, depth, start = [], 0, 0
  for j, c in enumerate(body):
    depth += (c == '{') - (c == '}')
    if c == ',' and depth == 0:
      parts.append(body[start:j])
      start = j + 1
  parts.append(body[start:])
  return parts


def _expand_range(m: re.Match) -> list[str]:
  a, b, step = m.group(1), m.group(2), abs(int(m.group(3) or 1)) or 1
  if a.isalpha() != b.isalpha():
    return []
  if a.isalpha():
    lo, hi = ord(a), ord(b)
    return [chr(c) for c in range(lo, hi + (1 if hi >= lo else -1), step if hi >= lo else -step)]
  lo, hi = int(a), int(b)
  padded = any(len(x.lstrip('-')) > 1 and x.lstrip('-').startswith('0') for x in (a, b))
  width = max(len(a), len(b)) if padded else 0
  values = range(lo, hi + (1 if hi >= lo else -1), step if hi >= lo else -step)
  return [f'{v:0{width}d}' for v in values]


def expand_braces(pattern: str) -> list[str]:
  """Bash-style brace expansion: ``{0000..0575}`` (zero-padded), ``{a,b}``, nested, several."""
  start = pattern.find('{')
  if start < 0:
    return [pattern]
  depth = 0
  for end in range(start, len(pattern)):
    depth += (pattern[end] == '{') - (pattern[end] == '}')
    if depth == 0:
      break
  else:
    raise DataSourceError(f'unbalanced braces in shard pattern {pattern!r}')
  prefix, body, rest = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
  alternatives = _split_top_level(body)
  if len(alternatives) == 1:
    m = _RANGE.fullmatch(body)
    alternatives = _expand_range(m) if m else []
    if not alternatives:  # '{x}' is literal, as in bash
      return [prefix + '{' + body + '}' + r for r in expand_braces(rest)]
  tails = expand_braces(rest)
  return [prefix + a + t for alt in alternatives for a in expand_braces(alt) for t in tails]


def expand_shards(spec: str | Sequence[str], *, check_exists: bool = True) -> list[str]:
  """Shard list from a brace pattern; several datasets joined with '::' (as the reference).

  Raises DataSourceError naming missing shard paths (before anything is read) or when empty.
  """
  parts = spec.split('::') if isinstance(spec, str) else list(spec)
  paths = [os.path.expanduser(p) for part in parts if part.strip()
           for p in expand_braces(part.strip())]
  if not paths:
    raise DataSourceError(f'no shards in {spec!r}')
  remote = [p for p in paths if p.startswith(_REMOTE)]
  if remote:
    raise DataSourceError(f'tar shards must be local (or mounted) files; got {remote[0]!r}')
  if check_exists:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      listed = ', '.join(missing[:5]) + (', ...' if len(missing) > 5 else '')
      raise DataSourceError(f'{len(missing)} of {len(paths)} shards missing: {listed}')
  return paths


def split_member_name(name: str) -> tuple[str, str] | None:
  """'dir/000123.mask.png' -> ('dir/000123', 'mask.png'); None without an extension."""
  m = _MEMBER.match(name)
  return (m.group(1), m.group(2).lower()) if m else None


def _slot(suffix: str) -> int | None:
  if suffix in IMAGE_EXTS:
    return 0
  return {'json': 1, 'mask.png': 2, 'txt': 3}.get(suffix)


@dataclasses.dataclass(frozen=True)
class ShardIndex:
  """One shard's header scan: keys, spans int64 (n, 4 slots, 2 = offset/size; -1 when absent),
  error records {i: msg}, and what is wrong with the file as a whole (None when nothing)."""
  keys: list[str]
  spans: np.ndarray
  errors: dict[int, str]
  problem: str | None = None


def _problem_of(file_size: int, open_error: Exception | None, cut_member: str | None,
                broken_at: int | None) -> str | None:
  if file_size == 0:
    return 'empty file (0 bytes)'
  if open_error is not None:
    return f'not an uncompressed tar file ({open_error})'
  if cut_member is not None:
    return f'truncated: the file ends at byte {file_size}, inside member {cut_member}'
  if broken_at is not None:
    return f'broken tar header at byte {broken_at}, nothing after it is readable'
  return None


def index_shard(path: str, require_json: bool = True) -> ShardIndex:
  """Scans one shard's headers (no data reads).

  Members complete before a truncation are kept; the cut member is an error record.
  """
  file_size = os.path.getsize(path)
  groups: dict[str, dict] = {}
  truncated, end, open_error = False, 0, None
  cut_member, broken_at = None, None
  try:
    tar = tarfile.open(path, 'r:')  # uncompressed only: members must be seekable
  except (tarfile.TarError, OSError) as e:
    tar, open_error = None, e
  if tar is not None:
    with tar:
      while True:
        try:
          info = tar.next()
        except (tarfile.TarError, OSError, EOFError):
          break  # 'unexpected end of data' after a cut member, or a broken extended header
        if info is None:
          break
        split = split_member_name(info.name) if info.isfile() else None
        if split is None:
          continue
        group = groups.setdefault(split[0], {'found': []})
        group['found'].append('.' + split[1])
        if info.offset_data + info.size > file_size:
          truncated, cut_member = True, info.name
          group['error'] = (f'truncated member {info.name}: {info.size} bytes at '
                            f'{info.offset_data}, file ends at {file_size}')
          continue
        slot = _slot(split[1])
        if slot is None:
          continue
        if slot == 0 and 'ext' in group and IMAGE_EXTS.index(group['ext']) < IMAGE_EXTS.index(split[1]):
          continue
        if slot == 0:
          group['ext'] = split[1]
        group[slot] = (info.offset_data, info.size)
      end = tar.offset
  if not truncated:
    with open(path, 'rb') as f:
      f.seek(end)
      tail = f.read(tarfile.BLOCKSIZE)
    if tail.strip(b'\0'):  # not the zero end-of-archive blocks: a cut or corrupt header
      name = tail[:100].split(b'\0', 1)[0].decode('utf-8', 'replace')
      split = split_member_name(name)
      key = split[0] if split else f'__broken_header_at_{end}'
      what = f'not an uncompressed tar ({open_error})' if tar is None else 'broken tar header'
      groups.setdefault(key, {'found': []})['error'] = f'{what} at byte {end} (member {name!r})'
      broken_at = end
  keys = list(groups)
  spans = np.full((len(keys), len(_SLOTS), 2), -1, np.int64)
  errors = {}
  for i, (key, group) in enumerate(groups.items()):
    for slot in range(len(_SLOTS)):
      if slot in group:
        spans[i, slot] = group[slot]
    found = ', '.join(group['found']) or 'nothing'
    if 'error' in group:
      errors[i] = group['error']
    elif 0 not in group:
      errors[i] = f'missing image member (.{"/.".join(IMAGE_EXTS)}); found: {found}'
    elif 1 not in group and (require_json or 3 not in group):
      errors[i] = f'missing json member; found: {found}'
  problem = _problem_of(file_size, open_error if tar is None else None, cut_member, broken_at)
  return ShardIndex(keys, spans, errors, problem)


def _display_names(paths: list[str]) -> list[str]:
  """Basenames when unique, else paths relative to the common directory; '#n' on repeats."""
  names = [os.path.basename(p) for p in paths]
  if len(set(names)) < len(names):
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    names = [os.path.relpath(p, root) for p in absolute]
  seen: dict[str, int] = {}
  for i, name in enumerate(names):  # a shard listed twice (upsampling) still gets unique keys
    seen[name] = seen.get(name, 0) + 1
    names[i] = name if seen[name] == 1 else f'{name}#{seen[name]}'
  return names


class TarSource(RecordSource):
  """Random access over webdataset tar shards; records follow the shard order.

  Args:
    shards: a pattern for ``expand_shards`` or a list of shard paths.
    require_json: when False, a sample with ``.txt`` but no ``.json`` gets meta {'caption': txt}.
    index_workers: processes for the header scan; None = automatic (several for >= 64 shards).
  """

  def __init__(self, shards: str | Sequence[str], *, require_json: bool = True,
               index_workers: int | None = None):
    self.shards = expand_shards(shards)
    self.require_json = require_json
    names = _display_names(self.shards)
    self.name = names[0] if len(names) == 1 else f'{names[0]} (+{len(names) - 1} shards)'
    results = self._index_all(index_workers)
    counts = [len(r.keys) for r in results]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.shard_counts = np.asarray(counts, np.int64)
    self.shard_starts = offsets[:-1]
    self._shard_id = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    self._spans = (np.concatenate([r.spans for r in results]) if results
                   else np.zeros((0, len(_SLOTS), 2), np.int64))
    # Keys live in one utf-8 blob + offsets: compact to hold and fast to pickle to workers.
    encoded = [f'{name}/{key}'.encode() for name, r in zip(names, results) for key in r.keys]
    self._key_blob = b''.join(encoded)
    self._key_offsets = np.concatenate([[0], np.cumsum([len(k) for k in encoded])]).astype(np.int64)
    self.errors = {int(offsets[s]) + i: msg for s, r in enumerate(results)
                   for i, msg in r.errors.items()}
    self.shard_reports = [
        ShardReport(path, expected, len(r.keys), len(r.errors), r.problem)
        for path, expected, r in zip(self.shards, expected_counts(self.shards), results)]
    for report in self.shard_reports:
      if report.is_bad:
        log.warning('%s', report.describe())

  @property
  def missing_records(self) -> int:
    """Samples the shard indexes list that are no record of any shard (see the module doc)."""
    return sum(r.missing for r in self.shard_reports)

  def problems(self) -> list[str]:
    return [r.describe() for r in self.shard_reports if r.is_bad]

  def location(self) -> str:
    more = len(self.shards) - 5
    return ', '.join(self.shards[:5]) + (f' (+{more} more shards)' if more > 0 else '')

  def _index_all(self, workers: int | None) -> list[ShardIndex]:
    many = len(self.shards) >= 64
    if workers is None:
      workers = min(16, os.cpu_count() or 1) if many else 0
    args = [(p, self.require_json) for p in self.shards]
    bar = functools.partial(tqdm.tqdm, total=len(args), desc=f'indexing {self.name}',
                            unit='shard', disable=not many, dynamic_ncols=True)
    if workers <= 1 or len(self.shards) < 2:
      return list(bar(index_shard(*a) for a in args))
    # Header parsing is CPU-bound Python; spawn (not fork) because the caller may run JAX threads.
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      return list(bar(pool.map(index_shard, *zip(*args))))

  def __len__(self) -> int:
    return len(self._shard_id)

  @property
  def num_errors(self) -> int:
    """Error records known from the headers (malformed json is only found when read)."""
    return len(self.errors)

  def key(self, index: int) -> str:
    i = self._check_index(index)
    return self._key_blob[self._key_offsets[i]:self._key_offsets[i + 1]].decode()

  def shard_of(self, index: int) -> str:
    return self.shards[self._shard_id[self._check_index(index)]]

  def __getitem__(self, index: int) -> Record:
    i = self._check_index(index)
    key = self.key(i)
    if i in self.errors:
      return error_record(key, self.errors[i])
    try:
      # One open per record: thread- and fork-safe, no descriptors to leak or pickle.
      with open(self.shards[self._shard_id[i]], 'rb', buffering=0) as f:
        data = [_read(f, *span) if span[0] >= 0 else None for span in self._spans[i]]
      record = {'key': key, 'image': data[0]}
      if data[1] is not None:
        meta = json.loads(data[1])
        if not isinstance(meta, dict):
          raise ValueError(f'json member is a {type(meta).__name__}, not an object')
      else:
        meta = {'caption': data[3].decode('utf-8').strip()}
      record['meta'] = meta
      if data[2] is not None:
        record['mask'] = data[2]
      return record
    except (OSError, ValueError) as e:  # ValueError covers JSON and unicode decode errors
      return error_record(key, f'{type(e).__name__}: {e}')


def _read(f, offset: int, size: int) -> bytes:
  f.seek(int(offset))
  data = f.read(int(size))
  if len(data) != size:
    raise OSError(f'short read: {len(data)} of {size} bytes at {offset}')
  return data
