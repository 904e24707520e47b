"""Resuming: the newest checkpoint step that verifies and restores; damaged steps set aside.

A step is restored only after its integrity record verifies (``checkpoint_integrity``) and
its saved tree fits the run's model. Damage (a file missing, truncated or changed, an item
gone, orbax unable to read it) is named in one warning, the step moved to
``damaged/<step>-<why>`` and the next older one tried; with ``fallback=False`` the first
damaged step is an error instead. A step that holds another model is not damage but a usage
error naming the config fields that differ. Every host decides alike (the first host's
finding wins), so a multi-host run never splits over which step it resumes.

Used by ``checkpoint.Checkpointer``, which owns the orbax manager.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from cosmos_jax.errors import RunError, UsageError
from cosmos_jax.train import checkpoint_diagnosis as diagnosis
from cosmos_jax.train import checkpoint_integrity as integrity
from cosmos_jax.train.distributed import allgather_json

log = logging.getLogger(__name__)

DAMAGED_DIR = 'damaged'

# (state, this host's data state or None, the saved config or None)
Restored = tuple[Any, Optional[dict], Optional[dict]]


class _Damaged(Exception):
  def __init__(self, damage: integrity.Damage, cause: Optional[BaseException] = None):
    super().__init__(str(damage))
    self.damage, self.cause = damage, cause


class Restorer:
  """Restores steps of ``mngr`` (an orbax ``CheckpointManager`` over ``directory``)."""

  def __init__(self, mngr: ocp.CheckpointManager, directory: epath.Path, *, read_only: bool,
               fallback: bool, read_config: Callable[[int], Optional[dict]]):
    self._mngr, self.directory = mngr, directory
    self.read_only, self.fallback, self._read_config = read_only, fallback, read_config

  def restore(self, step: int, target: Any, config: Any) -> Restored:
    """``step`` exactly; RunError if it is damaged (nothing is moved)."""
    try:
      return self._restore_verified(step, target, config)
    except _Damaged as d:
      raise RunError(f'the checkpoint of step {step} in {self.directory} is damaged: '
                     f'{d.damage}') from d.cause

  def restore_newest(self, target: Any, config: Any) -> Optional[Restored]:
    """The newest step that verifies and restores, or None if there is none."""
    damaged: list[int] = []
    for _ in range(3):   # a reader may see the live run delete a step it was about to read
      vanished = False
      for step in sorted(self._mngr.all_steps(), reverse=True):
        if step in damaged:
          continue
        try:
          restored = self._restore_verified(step, target, config)
        except _Damaged as d:
          if self.read_only and not (self.directory / str(step)).is_dir():
            vanished = True
            break
          if not self.fallback:
            raise RunError(f'the checkpoint of step {step} in {self.directory} is damaged: '
                           f'{d.damage}; move it away, or set --config.checkpoint.fallback=True'
                           ' to resume from the newest one that restores') from d.cause
          log.warning('checkpoint of step %d is damaged: %s; %s', step, d.damage,
                      self._set_aside(step, d.damage))
          damaged.append(step)
          continue
        if damaged:
          log.warning('resuming from step %d, the newest checkpoint that restores and '
                      'verifies (damaged: %s)', step, ', '.join(map(str, damaged)))
        return restored
      if not vanished:
        break
      self._mngr.reload()
    if damaged:
      raise RunError(f'no checkpoint in {self.directory} restores: steps '
                     f'{", ".join(map(str, damaged))} are damaged'
                     + ('' if self.read_only else f' (kept in {self.directory / DAMAGED_DIR})'))
    return None

  def _agree(self, local: Optional[integrity.Damage]) -> Optional[integrity.Damage]:
    """The first host's damage if any host found one: every host decides alike."""
    if jax.process_count() == 1:
      return local
    found = allgather_json(None if local is None else [local.tag, local.detail])
    return next((integrity.Damage(*f) for f in found if f is not None), None)

  def _restore_verified(self, step: int, target: Any, config: Any) -> Restored:
    step_dir = os.fspath(self.directory / str(step))
    damage = integrity.verify(step_dir) if jax.process_index() == 0 else None
    if damage := self._agree(damage):
      raise _Damaged(damage)
    if not integrity.has_record(step_dir):
      log.warning('checkpoint of step %d has no integrity record (saved by an older version, '
                  'or the run stopped while writing it): restored unverified', step)
    try:
      metadata = self._mngr.item_metadata(step)
      present = set(metadata.keys())
      state_metadata = metadata['state'] if 'state' in present else None
    except Exception as e:
      raise _Damaged(integrity.Damage('unreadable', f'its metadata is unreadable '
                                      f'({diagnosis.first_line(e)})'), e) from e
    if state_metadata is None:
      raise _Damaged(integrity.Damage('missing', 'its state item is missing'))
    self._check_fits(step, getattr(state_metadata, 'tree', state_metadata), target, config)
    args = {'state': ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
    args.update({k: ocp.args.JsonRestore() for k in ('data', 'config') if k in present})
    problem, restored = None, None
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:   # tensorstore, orbax and JSON errors alike
      problem = e
    damage = None if problem is None else integrity.Damage(
        'unreadable', f'orbax could not read it ({diagnosis.first_line(problem)})')
    if damage := self._agree(damage):
      raise _Damaged(damage, problem)
    data_state = None
    if 'data' in present:
      data = restored['data']
      if data['process_count'] == jax.process_count():
        data_state = data['states'][jax.process_index()]
      else:
        log.warning('checkpoint %d holds the data state of %d hosts but %d run now; the '
                    'data stream restarts from its beginning', step, data['process_count'],
                    jax.process_count())
    log.info('restored checkpoint of step %d from %s', step, self.directory)
    return restored['state'], data_state, restored['config'] if 'config' in present else None

  def _check_fits(self, step: int, saved_tree: Any, target: Any, config: Any) -> None:
    """UsageError naming the differing config fields when the step holds another model."""
    message = diagnosis.mismatch(saved_tree, target, lambda: self._read_config(step), config)
    if message:
      raise UsageError(f'the checkpoint of step {step} in {self.directory} holds another '
                       f'model than this run ({message}). Resume with the saved config, or '
                       'give a new --workdir')

  def _set_aside(self, step: int, damage: integrity.Damage) -> str:
    """Moves a damaged step to damaged/<step>-<tag> (kept for inspection, out of the list)."""
    if self.read_only:
      return 'left in place (read-only); trying the previous one'
    dest = self.directory / DAMAGED_DIR / f'{step}-{damage.tag}'
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      n = 1
      while dest.exists():
        n += 1
        dest = self.directory / DAMAGED_DIR / f'{step}-{damage.tag}-{n}'
      os.replace(os.fspath(self.directory / str(step)), os.fspath(dest))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'cosmos_jax checkpoint set aside {step}')
    self._mngr.reload()
    return f'moved to {dest}; trying the previous one'
