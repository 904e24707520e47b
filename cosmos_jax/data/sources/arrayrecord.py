"""ArrayRecord datasets through a tensorflow-datasets builder, without TensorFlow.

Written with ``file_format='array_record'`` and read with ``builder_from_directory(...)
.as_data_source(split)``: the two tfds paths that never import tensorflow.

The image is stored as its original encoded bytes (``Tensor(shape=(), dtype=object)``), not as
``tfds.features.Image``: Image would decode and re-encode (lossy for JPEG, PNG/WebP turned into
JPEG), fail the whole build on one undecodable file, and hand back pixels, where tar shards hand
back bytes. With bytes, both sources go through the same decode in the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
import io
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from cosmos_jax.data.sources.base import DataSourceError, Record, RecordSource, error_record

DATASET_NAME = 'cosmos_pairs'
SUMMARY_FILE = 'cosmos_conversion.json'
_INFO_FILE = 'dataset_info.json'


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'key': tfds.features.Text(),
      'image': tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes as stored
      'meta': tfds.features.Text(),  # the sample's json
      'mask': tfds.features.Tensor(shape=(), dtype=np.object_),  # png bytes; b'' when absent
  })


def _png(array: np.ndarray) -> bytes:
  from PIL import Image  # only for sources that hold decoded pixels
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def _encode(record: Record) -> dict[str, Any]:
  image, mask = record['image'], record.get('mask')
  return {
      'key': record['key'],
      'image': image if isinstance(image, bytes) else _png(image),
      'meta': json.dumps(record.get('meta', {}), ensure_ascii=False),
      'mask': b'' if mask is None else mask if isinstance(mask, bytes) else _png(mask),
  }


class CosmosPairs(tfds.core.GeneratorBasedBuilder):
  """Image-text records converted from any RecordSource (tar shards, CSV/JSONL, ...)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Encoded image bytes, json meta text, optional png mask.'}

  def __init__(self, *, sources: Mapping[str, RecordSource] | None = None,
               progress: bool = True, **kwargs):
    self._sources = dict(sources or {})
    self._progress = progress
    self.skipped: dict[str, list[tuple[str, str]]] = {}
    self.written: dict[str, int] = {}
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # No checksums or metadata live beside this module; tfds's own lookup of the package path
    # needs the `importlib_resources` backport for a package module such as this one.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    # Not dataset_info_from_configs: that looks for package metadata next to this file.
    return tfds.core.DatasetInfo(builder=self, features=_features(),
                                 description='COSMOS image-text records (cosmos_jax).')

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._sources}

  def _generate_examples(self, split: str):
    src = self._sources[split]
    skipped = self.skipped.setdefault(split, [])
    self.written[split] = 0
    for i in tqdm.tqdm(range(len(src)), desc=f'{src.name} -> {split}', unit='rec',
                       disable=not self._progress, dynamic_ncols=True):
      record = src[i]
      if record.get('error'):
        skipped.append((record['key'], record['error']))
        continue
      self.written[split] += 1
      yield record['key'], _encode(record)


def convert_to_array_record(src: RecordSource | Mapping[str, RecordSource], out_dir: str, *,
                            split: str = 'train', num_shards: int | None = None,
                            progress: bool = True, overwrite: bool = False) -> str:
  """Writes ``src`` (or {split: source}) as an ArrayRecord tfds dataset; returns its directory.

  Error records are skipped and counted; the summary (written, skipped with keys and reasons)
  is printed when ``progress``, logged, and saved as ``cosmos_conversion.json`` in that directory.
  """
  sources = dict(src) if isinstance(src, Mapping) else {split: src}
  target = os.path.join(os.path.expanduser(out_dir), DATASET_NAME, str(CosmosPairs.VERSION))
  if os.path.exists(target):
    if not overwrite:
      raise DataSourceError(f'{target} exists; choose another out_dir or pass overwrite=True')
    shutil.rmtree(target)
  from tensorflow_datasets.core.utils import tqdm_utils
  tfds_bars = getattr(tqdm_utils, '_active', True)
  tfds.display_progress_bar(False)  # ours has the total; tfds's would not
  try:
    builder = CosmosPairs(sources=sources, progress=progress, data_dir=os.path.expanduser(out_dir),
                          file_format='array_record')
    with tempfile.TemporaryDirectory() as tmp:  # keeps tfds's 'downloads/' out of out_dir
      builder.download_and_prepare(download_dir=tmp, download_config=tfds.download.DownloadConfig(
          num_shards=num_shards, try_download_gcs=False))
  finally:
    tfds.display_progress_bar(tfds_bars)
  summary = {'dataset_dir': target, 'splits': {}}
  for name, source in sources.items():
    skipped = builder.skipped.get(name, [])
    summary['splits'][name] = {
        'source': source.name, 'written': builder.written.get(name, 0), 'skipped': len(skipped),
        'skipped_records': [{'key': k, 'error': e} for k, e in skipped]}
    line = (f'{source.name} -> {target} [{name}]: wrote {builder.written.get(name, 0)}, '
            f'skipped {len(skipped)}' + (f' (e.g. {skipped[0][0]}: {skipped[0][1]})' if skipped else ''))
    logging.info(line)
    if progress:
      print(line)
  with open(os.path.join(target, SUMMARY_FILE), 'w') as f:
    json.dump(summary, f, indent=1, ensure_ascii=False)
  return target


def find_dataset_dir(data_dir: str) -> str:
  """The single directory at or below ``data_dir`` that holds a tfds dataset_info.json."""
  data_dir = os.path.expanduser(data_dir)
  if os.path.isfile(os.path.join(data_dir, _INFO_FILE)):
    return data_dir
  found = sorted(root for root, dirs, files in os.walk(data_dir)
                 if _INFO_FILE in files and not os.path.basename(root).startswith('incomplete.'))
  if not found:
    raise DataSourceError(f'no tfds dataset ({_INFO_FILE}) under {data_dir}')
  if len(found) > 1:
    raise DataSourceError(f'several tfds datasets under {data_dir}: {found}; pass one of them')
  return found[0]


def _to_python(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  if isinstance(value, np.ndarray):
    return [_to_python(v) for v in value.tolist()] if value.dtype == object else value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


class ArrayRecordSource(RecordSource):
  """Contract records from a tfds ArrayRecord dataset (ours, or any with an 'image' feature).

  Other datasets: the key is '<name>:<split>:<index>' unless a 'key' feature exists, and meta
  holds every feature except image/mask/key (text decoded), unless a 'meta' json feature exists.
  """

  def __init__(self, data_dir: str, split: str = 'train'):
    self.dataset_dir = find_dataset_dir(data_dir)
    self.split = split
    builder = tfds.builder_from_directory(self.dataset_dir)
    splits = list(builder.info.splits.keys())
    if split.split('[')[0] not in splits:
      raise DataSourceError(f'{self.dataset_dir}: no split {split!r}; splits: {splits}')
    self.name = f'{builder.name}:{split}'
    self._ds = builder.as_data_source(split)
    self._len = len(self._ds)

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state['_ds'] = None  # reopened lazily in each worker process
    return state

  def _source(self):
    if self._ds is None:
      self._ds = tfds.builder_from_directory(self.dataset_dir).as_data_source(self.split)
    return self._ds

  def __len__(self) -> int:
    return self._len

  def location(self) -> str:
    return f'{self.dataset_dir} (split {self.split!r})'

  def __getitem__(self, index: int) -> Record:
    i = self._check_index(index)
    key = f'{self.name}:{i}'
    try:
      example = self._source()[i]
      if 'key' in example:
        key = _to_python(example['key'])
      record = {'key': key, 'image': example['image']}
      if 'meta' in example:
        record['meta'] = json.loads(example['meta'])
      else:
        record['meta'] = {k: _to_python(v) for k, v in example.items()
                          if k not in ('key', 'image', 'mask')}
      mask = example.get('mask')
      if mask is not None and (not isinstance(mask, bytes) or mask):
        record['mask'] = mask
      return record
    except Exception as e:  # noqa: BLE001  one unreadable record must not stop the run
      return error_record(key, f'{type(e).__name__}: {e}')
