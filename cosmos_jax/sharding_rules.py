"""The logical-axis rule presets: logical names (``models/layers.py``) -> mesh axes.

At the bottom of the package (nothing imported) so that the config's check and the mesh code
read one table. Earlier rules win; a mesh axis is used at most once per array (flax's
resolution), so under 'fsdp' an activation (batch, length, embed) shards its batch and keeps
its features whole, while a kernel (embed, mlp) shards its embed axis.
"""

from __future__ import annotations

from typing import Any, Sequence

AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')

Rules = Sequence[tuple[str, Any]]

RULE_PRESETS: dict[str, list[tuple[str, Any]]] = {
    'dp': [('batch', BATCH_AXES)],
    'fsdp': [('batch', BATCH_AXES), ('embed', 'fsdp')],
    'fsdp_tp': [('batch', BATCH_AXES), ('mlp', 'model'), ('qkv', 'model'), ('heads', 'model'),
                ('vocab', 'model'), ('embed', 'fsdp')],
}


def resolve_rules(rules: str | Rules) -> list[tuple[str, Any]]:
  """A preset's name or an explicit table -> the table, with list entries as tuples."""
  if isinstance(rules, str):
    if rules not in RULE_PRESETS:
      raise ValueError(f'unknown sharding rules preset {rules!r}; known: {", ".join(RULE_PRESETS)}')
    return list(RULE_PRESETS[rules])
  return [(str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes)
          for name, axes in rules]
