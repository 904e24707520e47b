"""cosmos_jax parameter directories: an orbax checkpoint of named trees plus the model config.

Layout of `path/`:
  model_config.json   the open_clip model-config dict, plus `cosmos` and `name`
  state/              orbax `StandardCheckpointer` checkpoint of `{tree name: params}`
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

from cosmos_jax.convert.mapping import ConversionError
from cosmos_jax.models.variants import ModelConfig, from_open_clip_json

CONFIG_FILE = 'model_config.json'
STATE_DIR = 'state'


def is_params_dir(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, CONFIG_FILE))
          and os.path.isdir(os.path.join(path, STATE_DIR)))


def save_params_dir(path: str, trees: Mapping[str, Any], config: ModelConfig, *,
                    overwrite: bool = False) -> None:
  """Writes `trees` (e.g. {'student': ..., 'teacher': ...}) and `config` to the directory `path`.

  An existing non-empty directory is an error, unless `overwrite` and it is a params dir.
  """
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.fspath(path))  # orbax wants absolute paths
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ConversionError(f'{path}: exists and is not a directory')
    if os.listdir(path):
      if not (overwrite and is_params_dir(path)):
        raise ConversionError(f'{path}: directory exists and is not empty'
                              + ('' if overwrite else '; remove it or choose another'))
      shutil.rmtree(path)
  os.makedirs(path, exist_ok=True)
  meta = {**config.to_open_clip_json(), 'cosmos': config.cosmos, 'name': config.name}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, STATE_DIR), dict(trees))
  checkpointer.wait_until_finished()
  # Written last: a directory with model_config.json holds a complete checkpoint.
  with open(os.path.join(path, CONFIG_FILE), 'w') as f:
    json.dump(meta, f, indent=2)
    f.write('\n')


def load_config(path: str) -> ModelConfig:
  """The ModelConfig stored in a params dir."""
  file = os.path.join(os.fspath(path), CONFIG_FILE)
  try:
    with open(file) as f:
      meta = json.load(f)
    cosmos, name = bool(meta.pop('cosmos')), str(meta.pop('name'))
    return from_open_clip_json(meta, name=name, cosmos=cosmos)
  except (OSError, KeyError, TypeError, ValueError) as e:
    raise ConversionError(f'{file}: not a valid cosmos_jax model config: {e}') from None


def load_params_dir(path: str) -> tuple[dict[str, Any], ModelConfig]:
  """The trees (nested dicts of numpy arrays) and config of a params dir."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ConversionError(f'{path}: no such directory')
  if not is_params_dir(path):
    raise ConversionError(f'{path}: not a cosmos_jax params directory (expected {CONFIG_FILE} '
                          f'and an orbax checkpoint in {STATE_DIR}/)')
  config = load_config(path)
  checkpointer = ocp.StandardCheckpointer()
  try:
    trees = checkpointer.restore(os.path.join(path, STATE_DIR))
  except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
    raise ConversionError(f'{path}: cannot restore the orbax checkpoint in {STATE_DIR}/: '
                          f'{type(e).__name__}: {e}') from None
  finally:
    checkpointer.wait_until_finished()
  if not isinstance(trees, Mapping) or not trees:
    raise ConversionError(f'{path}: the checkpoint holds no named parameter trees')
  return dict(trees), config
