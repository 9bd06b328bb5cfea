"""Child processes that do not outlive the script that started them.

Why: a script killed by its scheduler (or by a user's Ctrl-C on a benchmark) leaves its ``experiments.run``
children running -- still writing rows and holding the run directory's lock -- unless the kernel is told to
signal them. Linux's ``PR_SET_PDEATHSIG`` does that when the parent dies, however it dies (SIGKILL included).
The children get SIGTERM, so a run finishes its round, saves it and stops (``run/stop.py``).
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from typing import Any, Sequence

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
  """``preexec_fn`` of a child: the kernel sends it ``sig`` when the thread that started it exits.

  A no-op where ``prctl`` does not exist (not Linux): there the child may outlive its parent."""
  if not sys.platform.startswith("linux"):
    return
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def popen(args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
  """``subprocess.Popen`` whose child gets SIGTERM when this process dies."""
  return subprocess.Popen(list(args), preexec_fn=die_with_parent, **kwargs)


def run(args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
  """``subprocess.run`` whose child gets SIGTERM when this process dies."""
  return subprocess.run(list(args), preexec_fn=die_with_parent, **kwargs)
