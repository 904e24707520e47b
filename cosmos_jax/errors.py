"""The two kinds of failure the command line reports in one line (``cli.py`` maps them to exit codes).

``UsageError`` (exit 2): what the user asked for cannot work (a bad config field, a workdir
that is a file, a checkpoint of another model variant); fix the command or the config.
``RunError`` (exit 1): the run itself failed (a full disk, a non-finite loss, a checkpoint
that cannot be written); the message says what happened and what to do.
Both keep their cause (``raise ... from e``) for ``--debug`` and the log file.
"""

from __future__ import annotations


class UsageError(ValueError):
  """The command or the config cannot work as given (exit code 2)."""


class RunError(RuntimeError):
  """The run failed while it ran (exit code 1)."""
