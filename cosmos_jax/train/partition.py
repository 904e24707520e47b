"""The device mesh ('data', 'fsdp', 'model') and the logical-axis rules that shard onto it.

Parameters and main activations carry logical axis names (``models/layers.py``); the
config's rules table maps them to mesh axes (maxtext style). A dimension whose size the
mesh axes do not divide stays replicated rather than failing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# The presets live at the bottom of the package, beside the config's check.
from cosmos_jax.sharding_rules import (AXES, BATCH_AXES, RULE_PRESETS, Rules,  # noqa: F401
                                       resolve_rules)


@contextlib.contextmanager
def activation_rules(mesh: Optional[Mesh], rules: Rules) -> Iterator[None]:
  """While tracing a step: the models' ``constrain`` calls take effect on ``mesh``.

  Flax's logical constraints are no-ops without a rules table and a mesh in context; inside
  ``jit`` the mesh comes in as an abstract one.
  """
  if mesh is None or not rules:
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
    yield


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 with "the rest"; the product must equal the device count."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(AXES):
    raise ValueError(f'mesh shape {shape} must have {len(AXES)} entries for axes {AXES}')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {shape}: at most one -1 is allowed')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or num_devices % known:
      raise ValueError(f'mesh shape {shape} does not divide the {num_devices} devices')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f'mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are '
                     f'available; set config.mesh.shape so its product is {num_devices} '
                     f'(-1 fills one axis with the rest)')
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """An Auto-axes mesh (classic GSPMD; ``jax.make_mesh`` defaults to Explicit now)."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape(shape, len(devices))
  if devices == jax.devices():
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
  return Mesh(np.asarray(devices).reshape(shape), AXES,
              axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % n:
    raise ValueError(f'global batch size {global_batch} is not divisible by the data-parallel '
                     f'size {n} (mesh data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]}); '
                     f'use a multiple of {n}')


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def logical_shardings(boxed_abstract: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of (abstract) ``nn.LogicallyPartitioned`` leaves."""
  specs = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(specs, list(rules))
  shapes = nn.unbox(boxed_abstract)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P))
