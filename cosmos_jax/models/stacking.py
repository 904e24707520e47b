"""The two layouts of a tower's blocks: unrolled ``resblocks_{i}`` and scanned ``resblocks``.

With ``model.scan_layers`` the body (blocks 0..L-2) of each tower is one ``nn.scan`` whose
parameters are stacked on a leading axis under ``resblocks``; the last block stays
``resblocks_{L-1}`` (the training forwards call it apart). These functions convert any tree
shaped like the parameters (the parameters, the teacher, Adam's moments) between the two, so
that checkpoints, evaluation and the PyTorch converter work on either.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

_BLOCK = re.compile(r'resblocks_(\d+)$')


def _block_indices(tree: Mapping) -> list[int]:
  return sorted(int(m.group(1)) for k in tree if (m := _BLOCK.match(str(k))))


def _stack(leaves):
  return (np.stack if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack)(leaves)


def stack_layers(tree: Any) -> Any:
  """Unrolled -> scanned: in every mapping holding ``resblocks_0..resblocks_{L-1}`` (L > 1),
  blocks 0..L-2 become one ``resblocks`` with stacked leaves. Idempotent."""
  if not isinstance(tree, Mapping):
    return tree
  indices = _block_indices(tree)
  out = {k: stack_layers(v) for k, v in tree.items()}
  if len(indices) > 1 and 'resblocks' not in tree:
    if indices != list(range(len(indices))):
      raise ValueError(f'blocks {indices} are not numbered 0..{len(indices) - 1}')
    body = [out.pop(f'resblocks_{i}') for i in indices[:-1]]
    out['resblocks'] = jax.tree.map(lambda *x: _stack(x), *body)
  return out


def unstack_layers(tree: Any) -> Any:
  """Scanned -> unrolled: the inverse of ``stack_layers``; a tree without ``resblocks`` is
  returned as it is."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: unstack_layers(v) for k, v in tree.items()}
  if 'resblocks' in out:
    body = out.pop('resblocks')
    n = jax.tree.leaves(body)[0].shape[0]
    if _block_indices(out) != [n]:
      raise ValueError(f'a scanned body of {n} blocks needs the last block resblocks_{n} '
                       f'beside it, found {_block_indices(out)}')
    for i in range(n):
      out[f'resblocks_{i}'] = jax.tree.map(lambda x, i=i: x[i], body)
  return out


def is_stacked(tree: Any) -> bool:
  if not isinstance(tree, Mapping):
    return False
  return 'resblocks' in tree or any(is_stacked(v) for v in tree.values())
