"""The record-source interface shared by all data sources, and its error type.

Every source is random-access (``len(src)``, ``src[i]``), picklable (grain worker processes) and
returns raw, undecoded record dicts:

  key:   str, stable and unique within the source.
  image: bytes (encoded jpg/jpeg/png/webp as stored) or np.ndarray uint8 (H, W, 3).
  meta:  dict: the sample's json, or {'caption': str} / {'captions': list[str]}.
  mask:  optional, bytes (png) or np.ndarray uint8 (H, W).
  error: optional str, set instead of image/meta when the record itself is unreadable. The pipeline
         skips and counts such records by key; ``__getitem__`` never raises for one bad record.
"""

from __future__ import annotations

import abc
from typing import Any

Record = dict[str, Any]


class DataSourceError(ValueError):
  """A data source cannot be opened at all (missing shard, missing column, unknown spec)."""


def error_record(key: str, error: str) -> Record:
  """The record returned in place of an unreadable one."""
  return {'key': key, 'error': error}


class RecordSource(abc.ABC):
  """Random-access, picklable source of raw record dicts (see the module docstring)."""

  name: str = ''

  @abc.abstractmethod
  def __len__(self) -> int:
    ...

  @abc.abstractmethod
  def __getitem__(self, index: int) -> Record:
    ...

  def _check_index(self, index: int) -> int:
    """Normalises a negative index; IndexError when out of range (ends plain iteration)."""
    n = len(self)
    index = int(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f'{self.name}: index {index} out of range [0, {n})')
    return index

  @property
  def missing_records(self) -> int:
    """Samples known to be lost before they became records (e.g. after a shard's cut)."""
    return 0

  def problems(self) -> list[str]:
    """One line per damaged part of the source (a shard, a file), naming it."""
    return []

  def location(self) -> str:
    """Where the records come from (paths), for messages."""
    return self.name

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.name!r}, {len(self)} records)'
