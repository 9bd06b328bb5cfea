"""How every CLI ends on a project error: one message on stderr, exit status 2, no traceback.

Why one place: the project's errors (``A2VError``: config, data, checkpoints, a locked run directory, a
full disk...) carry a message written for the user -- what was found, what was expected, what to do -- so
a traceback only hides it. Anything else is a bug and keeps its traceback. ``experiments.run`` (which also has to
leave a multi-process job) and the other CLIs (``guard``) all use ``is_project_error`` and ``report``.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from a2v_jax.errors import A2VError


class UsageError(A2VError, ValueError):
  """A command-line argument that cannot be used (argparse cannot tell), e.g. an unknown case name."""


# The errors that mean "this run cannot start (or go on) as configured": every project error (config, data,
# checkpoints, a locked run directory, ...) and a missing file.
PROJECT_ERRORS: tuple[type[BaseException], ...] = (A2VError, FileNotFoundError)


def is_project_error(e: BaseException) -> bool:
  """A project error (``PROJECT_ERRORS``), or a full disk wherever it was met."""
  from a2v_jax.checkpoint import is_disk_full
  return isinstance(e, PROJECT_ERRORS) or (isinstance(e, Exception) and is_disk_full(e))


def error_label(e: BaseException) -> str:
  from a2v_jax.checkpoint import DiskFullError, is_disk_full
  from a2v_jax.config import ConfigError
  from a2v_jax.generators.checkpoint import GeneratorCheckpointError
  from a2v_jax.run.lock import RunLockedError
  if isinstance(e, ConfigError):
    return "config error"
  if isinstance(e, GeneratorCheckpointError):
    return "generator checkpoint error"
  if isinstance(e, RunLockedError):
    return "run directory locked"
  if isinstance(e, DiskFullError):
    return "disk full"
  if isinstance(e, UsageError):
    return "error"
  if is_disk_full(e):  # met outside a checkpoint save (a metrics row, an embeddings file)
    return "disk full (free space and run again with --resume)"
  return f"error ({type(e).__name__})"


def report(e: BaseException) -> int:
  """Prints ``label: message`` on stderr (after what stdout holds); returns the exit status: 2, or for a run
  stopped by a signal after saving its round the shell's status of that signal (143 SIGTERM, 130 SIGINT)."""
  from a2v_jax.run.stop import Stopped
  sys.stdout.flush()
  if isinstance(e, Stopped):
    print(str(e), file=sys.stderr)
    return e.exit_status
  print(f"{error_label(e)}: {e}", file=sys.stderr)
  return 2


def guard(body: Callable[[], Any], *, interrupted: Optional[str] = None) -> int:
  """Runs a CLI's ``body``; returns its exit status.

  Args:
    body: the CLI's work; an int it returns is the status, anything else (rows, None) means 0.
    interrupted: what Ctrl-C prints (status 130); None lets KeyboardInterrupt through.

  Returns:
    body's status, or 2 after one message on a project error. Any other exception propagates.
  """
  try:
    status = body()
  except KeyboardInterrupt:
    if interrupted is None:
      raise
    sys.stdout.flush()
    print(f"interrupted: {interrupted}", file=sys.stderr)
    return 130
  except Exception as e:
    if not is_project_error(e):
      raise
    return report(e)
  return status if isinstance(status, int) and not isinstance(status, bool) else 0


def _bounded(kind: Callable[[str], Any], low: float, inclusive: bool, what: str) -> Callable[[str], Any]:
  import argparse

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (value >= low if inclusive else value > low) or value != value:
      raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value
  parse.__name__ = what  # argparse names the type in its message
  return parse


# argparse types of numeric flags: a value out of range is refused by argparse (exit 2, one usage line), before
# any work, instead of failing later (a negative round count, a zero timeout).
positive_int = _bounded(int, 1, True, "an integer >= 1")
non_negative_int = _bounded(int, 0, True, "an integer >= 0")
positive_float = _bounded(float, 0.0, False, "a number > 0")
non_negative_float = _bounded(float, 0.0, True, "a number >= 0")
