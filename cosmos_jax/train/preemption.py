"""Stopping a run cleanly: SIGTERM and a first Ctrl-C only raise a flag the loop reads.

The loop saves the current step and returns when the flag is up. A second Ctrl-C ends the
process at once (the default action of SIGINT): the checkpoints on disk stay consistent
because orbax finalises a step only by renaming its complete temporary directory.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

_INTERRUPT_NOTE = (b'\ninterrupted: saving the current step, then stopping '
                     b'(Ctrl-C again stops at once without saving)\n')


class PreemptionFlag:
  """Set by a signal handler; the training loop reads ``requested`` between steps."""

  def __init__(self):
    self._requested = False
    self.signum: Optional[int] = None
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self._requested

  @property
  def reason(self) -> str:
    """'interrupted' after Ctrl-C (SIGINT), else 'preempted'."""
    return 'interrupted' if self.signum == signal.SIGINT else 'preempted'

  def set(self, signum: Optional[int] = None) -> None:
    if not self._requested:
      self.signum = signum
    self._requested = True

  def _handle(self, signum: int, _frame: Any) -> None:
    self.set(signum)
    if signum == signal.SIGINT:
      # Only async-signal-safe work here: one write, then the next Ctrl-C kills the process.
      os.write(2, _INTERRUPT_NOTE)
      signal.signal(signal.SIGINT, signal.SIG_DFL)

  def install(self, signums: tuple[int, ...]) -> PreemptionFlag:
    for signum in signums:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def uninstall(self) -> None:
    """Puts the previous signal handlers back."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()


def install_sigterm_handler(signums: tuple[int, ...] = (signal.SIGTERM,)) -> PreemptionFlag:
  """SIGTERM (by default; the loop adds SIGINT) only sets the returned flag.

  Call it from the main thread, after ``jax.distributed.initialize``: that installs the
  handler of JAX's preemption service, which this one replaces (``should_stop`` watches
  both). The handler does no work itself: saving inside a signal handler could interrupt
  a step, a save or a lock held by orbax or logging.
  """
  if threading.current_thread() is not threading.main_thread():
    raise RuntimeError('install_sigterm_handler must be called from the main thread')
  return PreemptionFlag().install(signums)


def install_stop_handlers() -> PreemptionFlag:
  """SIGTERM and the first Ctrl-C set the flag; a second Ctrl-C stops the process at once."""
  return install_sigterm_handler((signal.SIGTERM, signal.SIGINT))


def should_stop(flag: PreemptionFlag, step: Optional[int] = None,
                checkpointer: Any = None) -> bool:
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
    log.warning('%s%s: saving it and stopping', 'Ctrl-C' if flag.reason == 'interrupted'
                else 'preemption requested', '' if step is None else f' at step {step}')
  return stop
