"""TPU slices by the names users type, and the datasheet figures of their chips.

``v5e-256`` and ``v6e-64`` count chips; ``v4-128`` and ``v5p-128`` count TensorCores, two per
chip (a v4 or v5p chip runs as one "megacore" device), so v4-128 is 64 chips in a 4x4x4 cube.
A raw libtpu topology (``v5e:16x16``, ``v4:4x4x4``, ``v5p:4x4x8`` or libtpu's own ``v5:4x4x8``)
is taken as it is. The devices come from ``jax.experimental.topologies``: compiling for them
needs the libtpu wheel, not a TPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One chip's datasheet figures (Cloud TPU system architecture pages)."""
  name: str
  hbm_bytes: int
  bf16_flops: float        # peak dense bf16 matmul FLOP/s
  hbm_bytes_per_s: float   # HBM bandwidth
  libtpu_prefix: str       # the generation in libtpu's topology names
  chip_config: str         # 'megacore': one device per chip of two TensorCores
  cores_per_chip: int      # what the accelerator-type name counts per chip
  dims: int                # torus dimensions (2 for v5e/v6e, 3 for v4/v5p)

  @property
  def fp32_flops(self) -> float:
    # The MXU has no float32 path: at JAX's default matmul precision a float32 dot runs as one
    # bf16 pass with float32 accumulation, at the bf16 rate (memory traffic stays float32).
    return self.bf16_flops


CHIPS: dict[str, ChipSpec] = {
    'v4': ChipSpec('v4', 32 * GIB, 275e12, 1.2e12, 'v4', 'megacore', 2, 3),
    'v5e': ChipSpec('v5e', 16 * GIB, 197e12, 0.819e12, 'v5e', 'default', 1, 2),
    'v5p': ChipSpec('v5p', 95 * GIB, 459e12, 2.765e12, 'v5', 'megacore', 2, 3),
    'v6e': ChipSpec('v6e', 32 * GIB, 918e12, 1.64e12, 'v6e', 'default', 1, 2),
}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v5': 'v5p', 'v6': 'v6e'}

# Slice shapes of the standard accelerator types, by chip count.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 768: (8, 8, 12),
              1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """What ``--tpu-topology`` names: a chip kind and a slice shape."""
  name: str                 # as the user typed it
  chip: ChipSpec
  shape: tuple[int, ...]    # chips per torus dimension

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def libtpu_name(self) -> str:
    return f'{self.chip.libtpu_prefix}:{"x".join(map(str, self.shape))}'

  def describe(self) -> str:
    return f'{self.name} = {self.libtpu_name} ({self.chips} {self.chip.name} chips)'


def _chip(generation: str, text: str) -> ChipSpec:
  generation = _ALIASES.get(generation, generation)
  if generation not in CHIPS:
    raise ValueError(f'TPU topology {text!r}: unknown generation {generation!r}; known: '
                     f'{", ".join(CHIPS)}')
  return CHIPS[generation]


def parse_target(text: str) -> TpuTarget:
  """'v5e-256', 'v4-128', 'v5p-128', 'v6e-64' or a raw 'v5e:16x16' -> a TpuTarget."""
  name = text.strip().lower()
  raw = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)*)', name)
  if raw:
    chip = _chip(raw.group(1), text)
    shape = tuple(int(s) for s in raw.group(2).split('x'))
    if len(shape) != chip.dims or min(shape) < 1:
      raise ValueError(f'TPU topology {text!r}: a {chip.name} slice has {chip.dims} positive '
                       f'dimensions, e.g. {chip.libtpu_prefix}:'
                       f'{"x".join(["2"] * chip.dims)}')
    return TpuTarget(text, chip, shape)
  typed = re.fullmatch(r'([a-z0-9]+?)-(\d+)', name)
  if not typed:
    raise ValueError(f'TPU topology {text!r}: give an accelerator type such as v5e-256, '
                     f'v4-128, v5p-128, v6e-64, or a libtpu topology such as v5e:16x16')
  chip = _chip(typed.group(1), text)
  count = int(typed.group(2))
  shapes = _SHAPES_2D if chip.dims == 2 else _SHAPES_3D
  chips, rest = divmod(count, chip.cores_per_chip)
  if rest or chips not in shapes:
    known = ', '.join(f'{chip.name}-{n * chip.cores_per_chip}' for n in sorted(shapes))
    what = 'TensorCores (2 per chip)' if chip.cores_per_chip == 2 else 'chips'
    raise ValueError(f'TPU topology {text!r}: {chip.name} names count {what}; the known '
                     f'slices are {known} (or give the shape, e.g. {chip.libtpu_prefix}:'
                     f'{"x".join(map(str, shapes[max(shapes)]))})')
  return TpuTarget(text, chip, shapes[chips])


def target_devices(target: TpuTarget) -> list[Any]:
  """The slice's devices for compiling ahead of time (needs libtpu; JAX on the CPU backend)."""
  from jax.experimental import topologies
  # A host drives 2x2 chips on every generation here; smaller slices are one host.
  host = tuple(min(s, 2) for s in target.shape[:2]) + (1,)
  desc = topologies.get_topology_desc(platform='tpu', topology_name=target.libtpu_name,
                                      chip_config_name=target.chip.chip_config,
                                      chips_per_host_bounds=host, num_slices=1)
  return list(desc.devices)
