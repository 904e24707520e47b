"""Record sources: webdataset tar shards, CSV/TSV/JSONL, ArrayRecord (tfds), synthetic.

``open_source(spec)`` picks one from a spec string. All return raw record dicts (see ``base``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from cosmos_jax.data.sources.base import DataSourceError, Record, RecordSource, error_record
from cosmos_jax.data.sources.tabular import TabularSource
from cosmos_jax.data.sources.tar import TarSource, expand_braces, expand_shards

__all__ = [
    'ArrayRecordSource', 'DataSourceError', 'Record', 'RecordSource', 'SyntheticSource',
    'TabularSource', 'TarSource', 'convert_to_array_record', 'error_record', 'expand_braces',
    'expand_shards', 'open_source',
]

_LAZY = ('ArrayRecordSource', 'CosmosPairs', 'convert_to_array_record')


def __getattr__(name: str) -> Any:
  # The ArrayRecord module imports tensorflow_datasets; load it only when used.
  if name in _LAZY:
    from cosmos_jax.data.sources import arrayrecord
    return getattr(arrayrecord, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


class SyntheticSource(RecordSource):
  """Wraps ``cosmos_jax.data.synthetic.SyntheticDataset`` (decoded uint8 images) as a source.

  ``config`` is a SyntheticConfig; keyword arguments override its fields (e.g. num_val=8).
  """

  def __init__(self, split: str = 'train', config: Any = None, **config_fields):
    module = 'cosmos_jax.data.synthetic'
    if importlib.util.find_spec(module) is None:
      raise DataSourceError(f"'synthetic:{split}' needs {module}, which is not installed")
    from cosmos_jax.data import synthetic
    try:
      if config is None:
        config = synthetic.config_from_fields(config_fields)
      elif config_fields:
        config = dataclasses.replace(config, **config_fields)
      self.dataset = synthetic.SyntheticDataset(config, split=split)
    except ValueError as e:
      raise DataSourceError(f'synthetic:{split}: {e}') from e
    self.name = f'synthetic:{split}'

  def __len__(self) -> int:
    return len(self.dataset)

  def __getitem__(self, index: int) -> Record:
    i = self._check_index(index)
    try:
      record = dict(self.dataset[i])  # keeps extras such as label/labels
    except Exception as e:  # noqa: BLE001  one bad record must not stop the run
      return error_record(f'{self.name}:{i}', f'{type(e).__name__}: {e}')
    record['key'] = str(record.get('key', f'{self.name}:{i}'))
    record.setdefault('meta', {})
    return record


def _has_tfds_dataset(directory: str) -> bool:
  return any('dataset_info.json' in files for _, _, files in os.walk(directory))


def open_source(spec: str, **kwargs) -> RecordSource:
  """The source for ``spec``; ``kwargs`` go to its constructor.

  * 'synthetic', 'synthetic:train', 'synthetic:val'      -> SyntheticSource
  * a brace/'::' tar pattern, or a path ending in .tar   -> TarSource
  * a .csv, .tsv or .jsonl file                          -> TabularSource
  * a directory with a tfds dataset_info.json below it   -> ArrayRecordSource (kwarg split=)
  * a directory of .tar files                            -> TarSource over them, sorted
  """
  spec = spec.strip()
  if spec == 'synthetic' or spec.startswith('synthetic:'):
    return SyntheticSource(spec.partition(':')[2] or 'train', **kwargs)
  path = os.path.expanduser(spec)
  lower = path.lower()
  if '::' in spec or '{' in spec or lower.endswith('.tar'):
    return TarSource(spec, **kwargs)
  if lower.endswith(('.csv', '.tsv', '.jsonl')):
    return TabularSource(path, **kwargs)
  if os.path.isdir(path):
    if _has_tfds_dataset(path):
      from cosmos_jax.data.sources.arrayrecord import ArrayRecordSource
      return ArrayRecordSource(path, **kwargs)
    tars = sorted(f for f in os.listdir(path) if f.lower().endswith('.tar'))
    if tars:
      return TarSource([os.path.join(path, f) for f in tars], **kwargs)
    raise DataSourceError(f'data source {spec!r}: directory holds neither a tfds dataset '
                          '(dataset_info.json) nor .tar shards')
  what = 'no such file or directory' if not os.path.exists(path) else 'unknown format'
  raise DataSourceError(f'cannot open data source {spec!r}: {what} (expected synthetic[:split], '
                        'tar shards, .csv/.tsv/.jsonl, or a tfds ArrayRecord directory)')
