"""What the command line prints: its logging (console and a run's log file) and one-line errors.

Console: INFO and up from cosmos_jax (and the root logger, which ``train`` logs to), WARNING and
up from everything else (absl, orbax, jax, grain), so a user sees "resumed from step N" but not
the libraries' chatter. A run's log file (``<workdir>/train.log``) gets every record, INFO and
up, plus the traceback of a failure. A failure prints one line on stderr,
``cosmos-jax <command>: error: <what is wrong and what to do>``, and exits 2 for a usage error
(``UsageError``, or a ValueError/FileNotFoundError of our own checks) or 1 for a run that failed
(``RunError``, OSError, errors escaping orbax/tensorstore/jax, anything unexpected); with
``--debug`` the traceback comes first. See docs/errors.md.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from typing import Optional

from cosmos_jax.errors import RunError, UsageError

FORMAT = '%(asctime)s %(levelname)s %(message)s'
FILE_FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'
MAX_MESSAGE_CHARS = 800
# Loggers whose INFO records are meant for the user; everything else shows from WARNING up.
_OWN_LOGGERS = ('root', 'cosmos_jax', '__main__')
# Packages whose errors are failures of the run, even when they raise ValueError.
_LIBRARIES = ('orbax', 'tensorstore', 'jax', 'jaxlib', 'etils', 'grain', 'array_record')
# absl status codes that tensorstore and XLA put at the start of their messages.
_STATUS_CODES = ('NOT_FOUND', 'RESOURCE_EXHAUSTED', 'DATA_LOSS', 'INTERNAL', 'UNKNOWN',
                 'FAILED_PRECONDITION', 'PERMISSION_DENIED', 'UNAVAILABLE', 'ABORTED',
                 'DEADLINE_EXCEEDED', 'OUT_OF_RANGE', 'CANCELLED', 'ALREADY_EXISTS',
                 'UNIMPLEMENTED', 'INVALID_ARGUMENT', 'UNAUTHENTICATED')
# What to do, after the system's own words (strerror) for the failure.
_ERRNO_HINTS = {
    errno.ENOSPC: 'free some space (or use a path on a larger disk) and run again; a training '
                  'run resumes from its last checkpoint',
    errno.EDQUOT: 'free some space and run again',
    errno.EACCES: 'make it writable (or readable) for this user, or choose another path',
    errno.EPERM: 'choose another path',
    errno.EROFS: 'choose a path on a writable file system',
    errno.ENOTDIR: 'a part of this path is a file, not a directory: choose another path',
    errno.EISDIR: 'give a file, not a directory',
    errno.EEXIST: 'something else is in the way there: remove it or choose another path',
}


def _is_own(record: logging.LogRecord) -> bool:
  return record.name == 'root' or record.name.split('.')[0] in _OWN_LOGGERS


class _ConsoleFilter(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if getattr(record, 'file_only', False):
      return False
    return record.levelno >= logging.WARNING or _is_own(record)


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever ``sys.stderr`` is at the time (pytest swaps it per test)."""

  def __init__(self):
    super().__init__(sys.stderr)

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):  # StreamHandler.__init__ assigns it; the property always wins
    del value


def _is_console_handler(handler: logging.Handler) -> bool:
  # The handler a library's basicConfig() put there, absl's, or ours from an earlier call;
  # anything else (pytest's capture, a user's handler) is left alone.
  return (type(handler) in (logging.StreamHandler, _StderrHandler)
          or type(handler).__name__ == 'ABSLHandler')


class Session:
  """Logging and error reporting for one command; ``close()`` undoes what it set up."""

  def __init__(self, command: str, *, level: int = logging.INFO, debug: bool = False):
    self.command = command
    self.debug = debug
    self.log_path: Optional[str] = None
    self._file_handler: Optional[logging.Handler] = None
    root = logging.getLogger()
    for handler in list(root.handlers):
      if _is_console_handler(handler):
        root.removeHandler(handler)
    self._console = _StderrHandler()
    self._console.setLevel(logging.DEBUG if debug else level)
    self._console.setFormatter(logging.Formatter(FORMAT))
    self._console.addFilter(_ConsoleFilter())
    root.addHandler(self._console)
    self._old_level = root.level
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger('absl').setLevel(logging.NOTSET)

  def log_to(self, path: str) -> None:
    """Also writes every record (INFO and up) to ``path``, appending; quietly none when the
    directory cannot be written (the command's own check then reports that in one line)."""
    try:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      handler = logging.FileHandler(path, mode='a', encoding='utf-8')
    except OSError:
      return
    handler.setLevel(logging.DEBUG if self.debug else logging.INFO)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    logging.getLogger().addHandler(handler)
    self._file_handler, self.log_path = handler, path

  def fail(self, exc: BaseException) -> int:
    """Reports ``exc`` in one line on stderr (the traceback first with --debug, and into the
    log file always); returns the exit code."""
    code = exit_code(exc)
    line = f'cosmos-jax {self.command}: error: {one_line(exc, log_path=self.log_path)}'
    if self._file_handler is not None:
      logging.getLogger('cosmos_jax.cli').error('%s', line, exc_info=exc,
                                                extra={'file_only': True})
    if self.debug:
      traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(line, file=sys.stderr, flush=True)
    return code

  def close(self) -> None:
    root = logging.getLogger()
    if self._file_handler is not None:
      root.removeHandler(self._file_handler)
      self._file_handler.close()
      self._file_handler = None
    root.setLevel(self._old_level)


def _raised_in_library(exc: BaseException) -> bool:
  text = str(exc).lstrip()
  if text.startswith(_STATUS_CODES):
    return True
  frames = traceback.extract_tb(exc.__traceback__)
  if not frames:
    return False
  parts = frames[-1].filename.replace('\\', '/').split('/')
  return any(lib in parts for lib in _LIBRARIES) and 'cosmos_jax' not in parts[-3:]


def _kind(exc: BaseException) -> str:
  """'usage', 'run' (a failure the message explains), 'library' (escaped a library), 'bug'."""
  if isinstance(exc, UsageError):
    return 'usage'
  if isinstance(exc, RunError):
    return 'run'
  if _raised_in_library(exc):
    return 'library'
  if isinstance(exc, (ValueError, FileNotFoundError)):
    return 'usage'
  if isinstance(exc, (OSError, FloatingPointError)):   # FloatingPointError: a non-finite loss
    return 'run'
  return 'bug'


def exit_code(exc: BaseException) -> int:
  """2: the command or its config cannot work; 1: the run failed; 130: interrupted."""
  if isinstance(exc, KeyboardInterrupt):
    return 130
  return 2 if _kind(exc) == 'usage' else 1


def _os_error_text(exc: OSError) -> str:
  where = ' -> '.join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
  hint = _ERRNO_HINTS.get(exc.errno) if exc.errno is not None else None
  text = f'{where}: {exc.strerror}' if where else exc.strerror
  return f'{text}: {hint}' if hint else text


def one_line(exc: BaseException, *, log_path: Optional[str] = None) -> str:
  """The message of ``exc`` on one line, with what to do when the exception does not say."""
  if isinstance(exc, KeyboardInterrupt):
    return 'interrupted'
  kind = _kind(exc)
  if isinstance(exc, OSError) and exc.strerror and kind != 'library':
    text = _os_error_text(exc)
  else:
    text = str(exc) or type(exc).__name__
  if kind in ('library', 'bug'):
    text = f'{type(exc).__name__}: {text}'
  text = '; '.join(part.strip() for part in text.splitlines() if part.strip())
  where = f'--debug, or {log_path}' if log_path else 'rerun with --debug'
  if len(text) > MAX_MESSAGE_CHARS:
    text = text[:MAX_MESSAGE_CHARS].rstrip() + f' ... (the whole message: {where})'
  if kind == 'library':
    text += f' (raised inside a library; the traceback: {where})'
  elif kind == 'bug':
    text += f' (an unexpected error, please report it with the traceback: {where})'
  return text
