"""Loading ``--config configs/<file>.py[:arg]`` and applying ``--config.<field>=<value>`` overrides."""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``path.py`` or ``path.py:arg``: calls the file's ``get_config(arg)``."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  module_spec = importlib.util.spec_from_file_location(
      f'cosmos_jax_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{path} has no get_config(arg) function')
  config = module.get_config(arg) if arg else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f'{path}: get_config() must return an ml_collections.ConfigDict')
  return config


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text   # a bare string such as ViT-B-16


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Each override is ``--config.a.b=value``; an unknown field or a wrong type is an error."""
  for item in overrides:
    if not item.startswith('--config.') or '=' not in item:
      raise ValueError(f'unrecognised argument {item!r} (overrides look like --config.optim.lr=1e-3)')
    dotted, _, raw = item[len('--config.'):].partition('=')
    *parents, leaf = dotted.split('.')
    node = config
    for i, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ValueError(f'unknown config field {".".join(parents[:i + 1])!r} in {item!r}')
      node = node[part]
    if leaf not in node:
      raise ValueError(f'unknown config field {dotted!r}; known fields here: {sorted(node.keys())}')
    value = _parse_value(raw)
    old = node[leaf]
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, str) and not isinstance(value, str):
      value = raw
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f'bad value for config.{dotted}: {raw!r} ({e})') from None
