"""CSV/TSV and JSONL files of image paths and captions (open_clip's --csv-* conventions)."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from cosmos_jax.data.sources.base import DataSourceError, Record, RecordSource, error_record

_URL = ('http://', 'https://', 'gs://', 's3://')
_JSONL_CAPTIONS = ('caption', 'captions')


def _missing_column(path: str, kind: str, column: str, found: list[str]) -> DataSourceError:
  return DataSourceError(f'{path}: no {kind} column {column!r}; columns found: {found}')


class TabularSource(RecordSource):
  """Rows of (image path, caption); image paths are relative to the file's directory.

  Args:
    path: a ``.csv``, ``.tsv`` or ``.jsonl`` file.
    image_key: the image-path column (open_clip ``--csv-img-key``).
    caption_key: the caption column (``--csv-caption-key``); None means 'title' for CSV/TSV
      and, for JSONL, 'caption' (a string) or 'captions' (a list of strings), whichever a row has.
    separator: None = tab for .tsv; for .csv a comma, unless the header has tabs and no commas
      (open_clip's own default separator is a tab, whatever the file is called).
  Records: meta is {'caption': str} or {'captions': list[str]}; the key is '<file name>:<row>'.
  """

  def __init__(self, path: str, image_key: str = 'filepath', caption_key: str | None = None,
               separator: str | None = None):
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise DataSourceError(f'no such file: {path}')
    self.path, self.name = path, os.path.basename(path)
    self.root = os.path.dirname(os.path.abspath(path))
    self.image_key, self.caption_key = image_key, caption_key
    self._images: list[str | None] = []
    self._captions: list[Any] = []
    self.errors: dict[int, str] = {}
    ext = path.lower().rsplit('.', 1)[-1]
    if ext in ('csv', 'tsv'):
      self._load_csv(ext, separator)
    elif ext == 'jsonl':
      self._load_jsonl()
    else:
      raise DataSourceError(f'{path}: expected a .csv, .tsv or .jsonl file')
    first = next((p for p in self._images if p), '')
    if first.startswith(_URL):
      raise DataSourceError(f'{path}: image paths are URLs ({first!r}); download the images first '
                            '(e.g. img2dataset to tar shards)')

  def _load_csv(self, ext: str, separator: str | None) -> None:
    caption_key = self.caption_key or 'title'
    csv.field_size_limit(2**31 - 1)  # long recaptioned texts
    with open(self.path, newline='', encoding='utf-8') as f:
      if separator is None:
        header_line = f.readline()
        f.seek(0)
        tabbed = '\t' in header_line and ',' not in header_line
        separator = '\t' if ext == 'tsv' or tabbed else ','
      rows = csv.reader(f, delimiter=separator)
      header = next(rows, None)
      if header is None:
        raise DataSourceError(f'{self.path}: empty file (no header row)')
      for kind, column in (('image', self.image_key), ('caption', caption_key)):
        if column not in header:
          raise _missing_column(self.path, kind, column, header)
      image_col, caption_col = header.index(self.image_key), header.index(caption_key)
      for row in rows:
        if not row:
          continue
        if len(row) != len(header):
          self.errors[len(self._images)] = f'row has {len(row)} fields, header has {len(header)}'
          self._images.append(None)
          self._captions.append(None)
          continue
        self._images.append(row[image_col])
        self._captions.append(row[caption_col])

  def _load_jsonl(self) -> None:
    checked = False
    with open(self.path, encoding='utf-8') as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        i = len(self._images)
        image, caption = None, None
        try:
          row = json.loads(line)
          if not isinstance(row, dict):
            raise ValueError(f'a {type(row).__name__}, not an object')
        except ValueError as e:
          row = e
        if not checked and isinstance(row, dict):  # the first row's columns act as a CSV header
          checked = True
          self._check_jsonl_columns(row)
        try:
          if isinstance(row, Exception):
            raise row
          image = row[self.image_key]
          caption = self._jsonl_caption(row)
        except (ValueError, KeyError) as e:
          self.errors[i] = f'line {line_no}: {type(e).__name__}: {e}'
        self._images.append(image)
        self._captions.append(caption)

  def _check_jsonl_columns(self, row: dict) -> None:
    if self.image_key not in row:
      raise _missing_column(self.path, 'image', self.image_key, list(row))
    wanted = (self.caption_key,) if self.caption_key else _JSONL_CAPTIONS
    if not any(k in row for k in wanted):
      raise _missing_column(self.path, 'caption', ' or '.join(wanted), list(row))

  def _jsonl_caption(self, row: dict) -> str | list[str]:
    keys = (self.caption_key,) if self.caption_key else _JSONL_CAPTIONS
    for k in keys:
      if k in row and row[k] is not None:
        value = row[k]
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
    raise KeyError(f'no caption ({" or ".join(keys)})')

  def location(self) -> str:
    return self.path

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> Record:
    i = self._check_index(index)
    key = f'{self.name}:{i}'
    if i in self.errors:
      return error_record(key, self.errors[i])
    path = os.path.join(self.root, os.path.expanduser(self._images[i]))
    try:
      with open(path, 'rb') as f:
        image = f.read()
    except OSError as e:
      return error_record(key, f'unreadable image file {path}: {e.strerror or e}')
    caption = self._captions[i]
    meta = {'captions': caption} if isinstance(caption, list) else {'caption': caption}
    return {'key': key, 'image': image, 'meta': meta}
