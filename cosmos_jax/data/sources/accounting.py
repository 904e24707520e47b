"""Shard accounting: what each tar shard gave against what an index lists for it.

The index is open_clip's ``sizes.json`` in the shard's directory (``{"<shard>.tar": n}``) or
img2dataset's ``<stem>_stats.json`` (``successes``). An empty, truncated or non-tar shard, or
one with fewer records than its index lists, is named in one warning with what it lost; the
samples that never became records are the source's ``missing_records`` (unreadable records
are counted by the pipeline when it reads them).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import logging
import os

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardReport:
  """What one shard gave against what its index expected."""
  path: str
  expected: int | None  # samples its index lists; None when no index lists this shard
  indexed: int  # records found in its headers, unreadable ones included
  unreadable: int  # of those, records known bad from the headers
  problem: str | None  # the file's own fault: empty, not a tar, truncated, broken header

  @property
  def missing(self) -> int:
    """Samples the index lists that are not even records (lost after a cut, say)."""
    return max(self.expected - self.indexed, 0) if self.expected is not None else 0

  @property
  def is_bad(self) -> bool:
    return self.problem is not None or self.missing > 0

  def describe(self) -> str:
    readable = self.indexed - self.unreadable
    what = self.problem or 'fewer records than its index lists'
    bad = f', {self.unreadable} unreadable' if self.unreadable else ''
    if self.expected is not None:
      return (f'shard {self.path}: {what}: {readable} of {self.expected} samples readable '
              f'({self.missing} missing{bad})')
    stem = os.path.splitext(os.path.basename(self.path))[0]
    return (f'shard {self.path}: {what}: {readable} samples readable{bad}; how many it lost is '
            f'unknown (no sizes.json or {stem}_stats.json beside it lists it)')


def _read_index_file(path: str) -> object:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    log.warning('ignoring shard index %s: %s', path, e)
    return None


def expected_counts(paths: Sequence[str]) -> list[int | None]:
  """Samples each shard should hold, from ``sizes.json`` beside it or ``<stem>_stats.json``."""
  sizes_by_dir: dict[str, object] = {}
  counts: list[int | None] = []
  for path in paths:
    directory, base = os.path.split(path)
    if directory not in sizes_by_dir:
      sizes_by_dir[directory] = _read_index_file(os.path.join(directory or '.', 'sizes.json'))
    sizes = sizes_by_dir[directory]
    value = sizes.get(base) if isinstance(sizes, dict) else None
    if value is None:
      stats = _read_index_file(os.path.splitext(path)[0] + '_stats.json')
      value = stats.get('successes') if isinstance(stats, dict) else None
    counts.append(int(value) if isinstance(value, (int, float)) and value >= 0 else None)
  return counts
