"""Checkpoints (orbax, async) of the train state, the data-iterator state and the config.

A checkpoint of step ``s`` is the directory ``<workdir>/s`` with three items and a record:

  state           the train-state pytree (sharded arrays, written by every host)
  data            {'process_count': n, 'states': [iterator state of each host]} (JSON)
  config          the resolved config (JSON)
  integrity.json  every file's size and SHA-256 (``checkpoint_integrity``)

Orbax writes a step into ``s.orbax-checkpoint-tmp`` and renames it to ``s`` only once every
item and the record are complete, and lists only finalised steps, so a crash during a save
leaves the previous checkpoint the latest one; the trainer removes such leftovers when it
opens the directory. A reader (``read_only=True``: evaluation beside a live run) creates,
cleans and deletes nothing.

Resuming (``checkpoint_restore``) verifies the newest step and restores it; a damaged one is
named in one warning, moved to ``damaged/<s>-<why>`` and the next older step is tried
(``fallback=False``: an error instead). A failed save (a full disk) is reported as one
``RunError`` as soon as it is known, with the previous checkpoint intact.

Restoring takes the target as ShapeDtypeStructs with shardings (``state.abstract_state``):
orbax reads each shard for the target's sharding, so a checkpoint written on one mesh
restores onto any other mesh shape or device count.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store

from cosmos_jax.errors import RunError
from cosmos_jax.train import checkpoint_diagnosis as diagnosis
from cosmos_jax.train import checkpoint_integrity as integrity
from cosmos_jax.train.checkpoint_diagnosis import check_workdir_writable  # noqa: F401
from cosmos_jax.train.checkpoint_restore import Restored, Restorer
from cosmos_jax.train.distributed import allgather_json
from cosmos_jax.train.preemption import (  # noqa: F401  (part of this module's interface)
    PreemptionFlag, install_sigterm_handler, install_stop_handlers, should_stop)

log = logging.getLogger(__name__)


def _pytree_handler(replica_parallel: bool) -> ocp.PyTreeCheckpointHandler:
  """orbax's standard pytree handler with replica-parallel writing switched on or off.

  Replica-parallel saving splits each replicated array among its replicas with one jitted
  slice per shard and shape. That spreads the writes over hosts; with one process, which
  writes everything anyway, it only costs compiles (6 s of the 7 s of the first save of the
  tiny model on 8 CPU devices).
  """
  th = ocp.type_handlers
  scalar = th.ScalarHandler()
  arrays = th.ArrayHandler(use_replica_parallel=replica_parallel,
                           array_metadata_store=array_metadata_store.Store())
  registry = th.create_type_handler_registry(
      (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
      (np.ndarray, th.NumpyHandler()), (jax.Array, arrays), (str, th.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
  """An orbax ``CheckpointManager`` for {state, data, config}, one directory per step.

  Every method must be called by all processes at the same steps (orbax synchronises them).
  """

  def __init__(self, directory: str | epath.PathLike, *, save_every_steps: int = 1000,
               keep: Optional[int] = 3, async_save: bool = True,
               replica_parallel: Optional[bool] = None, read_only: bool = False,
               fallback: bool = True):
    """``replica_parallel``: None is on with several processes, off with one.

    ``read_only``: a reader beside a possibly live run: no directory created, no temporary
    directory removed, nothing saved, deleted or moved; only finalised steps are seen.
    ``fallback``: on resume, a damaged newest step is set aside and the next one tried.
    """
    if save_every_steps < 1:
      raise ValueError(f'save_every_steps must be >= 1, got {save_every_steps}')
    self.directory = epath.Path(directory).absolute()
    self.read_only, self.fallback, self._async = read_only, fallback, async_save
    self._pending: Optional[int] = None   # the step whose save may still be in flight
    self._recording: Optional[int] = None   # the step the finalisation hook records
    self._save_bytes = 0
    if read_only:
      if not self.directory.is_dir():
        raise FileNotFoundError(f'no checkpoint directory {self.directory}')
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False, max_to_keep=None,
          save_interval_steps=0, enable_async_checkpointing=False)
    else:
      policies = ocp.checkpoint_managers
      # Every save_every_steps and at JAX's preemption sync point; without orbax's default
      # extra save at the first step of a fresh run.
      policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every_steps),
                                       policies.PreemptionCheckpointingPolicy()])
      # Always orbax's async path: its finalisation hook writes the integrity record into
      # the temporary directory; async_save=False then waits for each save.
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=True, create=True,
          save_decision_policy=policy,
          async_options=ocp.AsyncOptions(post_finalization_callback=self._write_record),
          cleanup_tmp_directories=True)  # leftovers of a save that crashed
    if replica_parallel is None:
      replica_parallel = jax.process_count() > 1
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = _pytree_handler(replica_parallel)
    registry.add('state', ocp.args.PyTreeSave, state_handler)
    registry.add('state', ocp.args.PyTreeRestore, state_handler)
    for item in ('data', 'config'):
      json_handler = ocp.JsonCheckpointHandler()
      registry.add(item, ocp.args.JsonSave, json_handler)
      registry.add(item, ocp.args.JsonRestore, json_handler)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       handler_registry=registry)
    self._restorer = Restorer(self._mngr, self.directory, read_only=read_only,
                              fallback=fallback, read_config=self.read_config)

  # Saving.

  def save(self, step: int, state: Any, *, data_state: Optional[dict] = None,
           config: Any = None, force: bool = False) -> bool:
    """Starts saving ``step`` when due (every ``save_every_steps``) or when ``force``.

    Returns whether a save started. The device-to-host copy happens before this returns,
    so ``state`` may be donated right after; the write to disk continues in the background.
    ``data_state`` is this host's iterator state; it must be None on all hosts or on none.
    Raises RunError if this save, or the one before it, fails.
    """
    if self.read_only:
      raise RuntimeError(f'{self.directory} was opened read-only')
    step = int(step)
    if step in self._mngr.all_steps():
      # orbax raises on an existing step, even with force (e.g. the preemption save right
      # after a regular one).
      return False
    if not force and not self._mngr.should_save(step):
      return False
    self._finish_pending()
    args = {'state': ocp.args.PyTreeSave(state)}
    if data_state is not None:
      states = allgather_json(data_state)
      args['data'] = ocp.args.JsonSave({'process_count': len(states), 'states': states})
    if config is not None:
      args['config'] = ocp.args.JsonSave(diagnosis.as_dict(config))
    self._save_bytes, self._pending, self._recording = diagnosis.nbytes(state), step, step
    try:
      saved = self._mngr.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:
      self._pending = None
      raise self._save_error(step, e) from e
    if saved:
      log.info('saving checkpoint of step %d to %s', step, self.directory)
      if not self._async:
        self._finish_pending()
    else:
      self._pending = None
    return saved

  def _write_record(self) -> None:
    """orbax's post-finalisation hook (primary host, background thread): every host has
    written its part, the step is still in its temporary directory."""
    step = self._recording
    found = [p for p in glob.glob(os.fspath(self.directory / f'{step}.orbax-checkpoint-tmp*'))
             if os.path.isdir(p)] or [p for p in [os.fspath(self.directory / str(step))]
                                      if os.path.isdir(p)]
    if not found:
      raise RuntimeError(f'the directory of step {step} being saved is not in {self.directory}')
    integrity.write_record(max(found, key=os.path.getmtime))

  def check(self) -> None:
    """Raises RunError now if the save in flight has failed; cheap, call it every step."""
    if self._pending is not None and not self._mngr.is_saving_in_progress():
      self._finish_pending()

  def _finish_pending(self) -> None:
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      raise self._save_error(step, e) from e

  def _save_error(self, step: int, e: BaseException) -> RunError:
    """One line: what failed, what it needs, what is kept. The partial step is removed."""
    if jax.process_index() == 0:
      for partial in glob.glob(os.fspath(self.directory / f'{step}.orbax-checkpoint-tmp*')):
        shutil.rmtree(partial, ignore_errors=True)
    previous = [s for s in self._mngr.all_steps() if s != step
                and (self.directory / str(s)).is_dir()]
    kept = (f'the previous checkpoint (step {max(previous)}) is intact' if previous
            else 'there is no earlier checkpoint')
    if diagnosis.is_disk_full(e):
      try:
        free = diagnosis.gib(shutil.disk_usage(os.fspath(self.directory)).free)
      except OSError:
        free = 'unknown'
      return RunError(f'the checkpoint of step {step} could not be written: the disk of '
                      f'{self.directory} is full ({free} free, a checkpoint needs about '
                      f'{diagnosis.gib(self._save_bytes)}); {kept}. Free some space (or lower '
                      'checkpoint.keep) and run the same command again to resume')
    return RunError(f'the checkpoint of step {step} could not be written to {self.directory} '
                    f'({diagnosis.first_line(e)}); {kept}')

  # Restoring.

  def latest_step(self) -> Optional[int]:
    """The latest step, or None.

    A save in flight counts in the process that started it; a new ``Checkpointer`` sees
    only finalised steps.
    """
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def restore(self, step: Optional[int] = None, *, target: Any,
              config: Any = None) -> Restored:
    """(state, this host's data state or None, config or None) of ``step`` (default: latest).

    ``target``: the abstract state, ShapeDtypeStructs with the shardings wanted now.
    ``config``: the run's config, to name the fields that differ if the step does not fit.
    Raises RunError if the step is damaged (nothing is moved), UsageError if it holds
    another model.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'no finalised checkpoint in {self.directory}')
    self._finish_pending()   # a save of this step may still be in flight
    return self._restorer.restore(step, target, config)

  def restore_or_none(self, target: Any, *, config: Any = None) -> Optional[Restored]:
    """The newest step that verifies and restores, or None if there is none (a fresh run).

    Each damaged newer step is named in one warning and, unless read-only, moved to
    ``damaged/``; with ``fallback=False`` the first one raises RunError instead.
    """
    self._finish_pending()
    return self._restorer.restore_newest(target, config)

  def read_config(self, step: Optional[int] = None) -> Optional[dict]:
    """The resolved config saved with ``step`` (default: the newest step whose config reads),
    read without a target."""
    steps = [int(step)] if step is not None else sorted(self.all_steps(), reverse=True)
    for s in steps:
      path = self.directory / str(s) / 'config' / 'metadata'
      try:
        return json.loads(path.read_text())
      except (OSError, ValueError):
        continue
    return None

  def reached_preemption(self, step: int) -> bool:
    """True on all hosts at the step where JAX's preemption sync point was reached."""
    return self._mngr.reached_preemption(int(step))

  def wait(self) -> None:
    """Blocks until the saves in flight are on disk and finalised; RunError if one failed."""
    self._finish_pending()

  def close(self) -> None:
    """Waits for the saves in flight, then releases the manager (RunError if one failed)."""
    try:
      self._finish_pending()
    finally:
      self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
