"""Checkpoints (orbax, async) of the train state, the data-iterator state and the config.

A checkpoint of step ``s`` is the directory ``<workdir>/s`` with three items:

  state   the train-state pytree (sharded arrays, written by every host)
  data    {'process_count': n, 'states': [iterator state of host 0, ..., host n-1]} (JSON)
  config  the resolved config (JSON)

Orbax writes a step into ``s.orbax-checkpoint-tmp`` and renames it to ``s`` only once every
item is complete, and lists only finalised steps, so a crash during a save leaves the
previous checkpoint the latest one. The leftover tmp directory is removed when the next
``Checkpointer`` opens the directory.

Restoring takes the target as ShapeDtypeStructs with shardings (``state.abstract_state``):
orbax reads each shard for the target's sharding, so a checkpoint written on one mesh
restores onto any other mesh shape or device count.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store

log = logging.getLogger(__name__)


def _gather_json(obj: Any) -> list[Any]:
  """The JSON-serialisable ``obj`` of every process, in process order (a collective)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]


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


def _as_dict(config: Any) -> Any:
  return config.to_dict() if hasattr(config, 'to_dict') else config


class Checkpointer:
  """An orbax ``CheckpointManager`` for {state, data, config}, one directory per step.

  Every method must be called by all processes at the same steps (orbax synchronises them).
  """

  def __init__(self, directory: str | epath.PathLike, *, save_every_steps: int = 1000,
               keep: Optional[int] = 3, async_save: bool = True,
               replica_parallel: Optional[bool] = None):
    """``replica_parallel``: None is on with several processes, off with one."""
    if save_every_steps < 1:
      raise ValueError(f'save_every_steps must be >= 1, got {save_every_steps}')
    self.directory = epath.Path(directory).absolute()
    policies = ocp.checkpoint_managers
    # Every save_every_steps and at JAX's preemption sync point; without orbax's default
    # extra save at the first step of a fresh run.
    policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every_steps),
                                     policies.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        save_decision_policy=policy,
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

  def save(self, step: int, state: Any, *, data_state: Optional[dict] = None,
           config: Any = None, force: bool = False) -> bool:
    """Starts saving ``step`` when due (every ``save_every_steps``) or when ``force``.

    Returns whether a save started. The device-to-host copy happens before this returns,
    so ``state`` may be donated right after; the write to disk continues in the background.
    ``data_state`` is this host's iterator state; it must be None on all hosts or on none.
    """
    step = int(step)
    if step in self._mngr.all_steps():
      # orbax raises on an existing step, even with force (e.g. the preemption save right
      # after a regular one).
      return False
    if not force and not self._mngr.should_save(step):
      return False
    args = {'state': ocp.args.PyTreeSave(state)}
    if data_state is not None:
      states = _gather_json(data_state)
      args['data'] = ocp.args.JsonSave({'process_count': len(states), 'states': states})
    if config is not None:
      args['config'] = ocp.args.JsonSave(_as_dict(config))
    saved = self._mngr.save(step, args=ocp.args.Composite(**args), force=True)
    if saved:
      log.info('saving checkpoint of step %d to %s', step, self.directory)
    return saved

  def latest_step(self) -> Optional[int]:
    """The latest step, or None.

    A save in flight counts in the process that started it; a new ``Checkpointer`` sees
    only finalised steps.
    """
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def restore(self, step: Optional[int] = None, *,
              target: Any) -> tuple[Any, Optional[dict], Optional[dict]]:
    """(state, this host's data state or None, config or None) of ``step`` (default: latest).

    ``target``: the abstract state, ShapeDtypeStructs with the shardings wanted now.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'no finalised checkpoint in {self.directory}')
    self._mngr.wait_until_finished()  # a save of this step may still be in flight
    present = set(self._mngr.item_metadata(step).keys())
    args = {'state': ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
    args.update({k: ocp.args.JsonRestore() for k in ('data', 'config') if k in present})
    restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
    data_state = None
    if 'data' in present:
      data = restored['data']
      if data['process_count'] == jax.process_count():
        data_state = data['states'][jax.process_index()]
      else:
        log.warning('checkpoint %d holds the data state of %d hosts but %d run now; the '
                    'data stream restarts from its beginning', step, data['process_count'],
                    jax.process_count())
    config = restored['config'] if 'config' in present else None
    log.info('restored checkpoint of step %d from %s', step, self.directory)
    return restored['state'], data_state, config

  def read_config(self, step: Optional[int] = None) -> Optional[dict]:
    """The resolved config saved with ``step`` (default: latest), read without a target."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      return None
    path = self.directory / str(step) / 'config' / 'metadata'
    return json.loads(path.read_text()) if path.exists() else None

  def restore_or_none(self, target: Any) -> Optional[tuple[Any, Optional[dict],
                                                           Optional[dict]]]:
    """``restore(target=target)`` of the latest step, or None if there is none (a fresh run)."""
    if self.latest_step() is None:
      return None
    return self.restore(target=target)

  def reached_preemption(self, step: int) -> bool:
    """True on all hosts at the step where JAX's preemption sync point was reached."""
    return self._mngr.reached_preemption(int(step))

  def wait(self) -> None:
    """Blocks until the saves in flight are on disk and finalised."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight, then releases the manager."""
    self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PreemptionFlag:
  """Set by a signal handler; the training loop reads ``requested`` between steps."""

  def __init__(self):
    self._requested = False
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self._requested

  def set(self) -> None:
    self._requested = True

  def install(self, signums: tuple[int, ...]) -> PreemptionFlag:
    for signum in signums:
      self._previous[signum] = signal.signal(signum, lambda *_: self.set())
    return self

  def uninstall(self) -> None:
    """Puts the previous signal handlers back."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()


def install_sigterm_handler(signums: tuple[int, ...] = (signal.SIGTERM,)) -> PreemptionFlag:
  """SIGTERM (by default) only sets the returned flag; the loop then saves and exits.

  Call it from the main thread, after ``jax.distributed.initialize``: that installs the
  handler of JAX's preemption service, which this one replaces (``should_stop`` watches
  both). The handler does no work itself: saving inside a signal handler could interrupt
  a step, a save or a lock held by orbax or logging.
  """
  if threading.current_thread() is not threading.main_thread():
    raise RuntimeError('install_sigterm_handler must be called from the main thread')
  return PreemptionFlag().install(signums)


def should_stop(flag: PreemptionFlag, step: Optional[int] = None,
                checkpointer: Optional[Checkpointer] = None) -> bool:
  """Whether to save and stop now: the same answer on every host.

  A collective when there are several processes: call it on all hosts after the same
  steps. True if any host got the signal, or (given ``step`` and ``checkpointer``) if
  JAX's preemption service reached its sync point for ``step``.
  """
  stop = flag.requested
  if jax.process_count() > 1:
    flags = multihost_utils.process_allgather(np.int32(stop))
    stop = bool(np.any(np.asarray(flags)))
  if step is not None and checkpointer is not None:
    stop = checkpointer.reached_preemption(step) or stop
  if stop:
    log.warning('preemption requested%s: saving and stopping',
                '' if step is None else f' at step {step}')
  return stop
