"""The integrity record of a checkpoint step: every file's size and SHA-256, checked on restore.

Orbax checks neither sizes nor contents when it reads a step: a flipped bit in a parameter
file is restored silently, a truncated file fails deep inside tensorstore. The record is
written by the primary host into the step's temporary directory after every host finished
writing and before orbax renames it to its final name, so a step is finalised together with
its record (a step saved by an older version has none and is restored unverified).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

RECORD_NAME = 'integrity.json'
# orbax rewrites its step metadata (commit time) when it renames the step: not recorded; a
# damaged one fails orbax's own read.
_UNRECORDED = ('_CHECKPOINT_METADATA',)
_CHUNK = 1 << 22


@dataclasses.dataclass(frozen=True)
class Damage:
  """What is wrong with a step: ``tag`` names its damaged/ directory, ``detail`` is for people."""
  tag: str
  detail: str

  def __str__(self) -> str:
    return self.detail


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
  """Paths relative to ``step_dir`` of every file in it but the record, sorted."""
  found = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if not rel.startswith(RECORD_NAME) and rel not in _UNRECORDED:
        found.append(rel)
  return sorted(found)


def write_record(step_dir: str) -> str:
  """Writes ``step_dir/integrity.json`` (atomically: a temporary name, then a rename)."""
  files = {rel: {'size': os.path.getsize(os.path.join(step_dir, rel)),
                 'sha256': _sha256(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
  path = os.path.join(step_dir, RECORD_NAME)
  with open(path + '.tmp', 'w') as f:
    json.dump({'version': 1, 'files': files}, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + '.tmp', path)
  return path


def has_record(step_dir: str) -> bool:
  return os.path.isfile(os.path.join(step_dir, RECORD_NAME))


def verify(step_dir: str) -> Optional[Damage]:
  """None if every recorded file is there with its size and checksum, else the first problem.

  A step without a record is not judged here (None); files the record does not list are
  ignored (nothing orbax wrote is missing from it).
  """
  path = os.path.join(step_dir, RECORD_NAME)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)['files']
  except (OSError, ValueError, KeyError) as e:
    return Damage('record', f'its integrity record {RECORD_NAME} is unreadable ({e})')
  for rel, want in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return Damage('missing', f'{rel} is missing')
    size = os.path.getsize(full)
    if size != want['size']:
      return Damage('truncated' if size < want['size'] else 'size',
                    f'{rel} has {size} bytes, {want["size"]} were written')
    if _sha256(full) != want['sha256']:
      return Damage('checksum', f'{rel} does not match its SHA-256 (changed on disk)')
  return None
