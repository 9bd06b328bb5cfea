"""One writer per run directory: an exclusive ``flock`` on ``RUN/.lock`` for as long as a run writes there.

Why: two runs started with the same ``name`` (two shells, a scheduler retrying a job) otherwise both pass the
"is this directory fresh?" checks and interleave their rows and checkpoints in one directory. Why ``flock``:
the kernel drops the lock when its holder exits, however it exits (``kill -9`` included), so a crashed run
never leaves a lock to clean by hand; ``LOCK_NB`` makes the second run fail at once instead of waiting.

The lock file holds the holder's pid and host, so the refusal can say who holds it. It is removed when the
lock is released (a finished run's directory holds no ``.lock``); one left by a killed run is stale and is
simply taken over. Locks are per process: a process that takes a lock it already holds (a notebook or test
running the same directory again after a failure) gets it back.

``flock`` on a network filesystem is only as good as the filesystem's lock support (Linux NFSv4 maps it
to a byte-range lock, which works across hosts).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from a2v_jax.errors import A2VError

LOCK_NAME = ".lock"


class RunLockedError(A2VError, RuntimeError):
  """The run directory is being written by another live run."""


class RunLock:
  """A held lock on one run directory; ``release`` (idempotent) lets the next run in."""

  def __init__(self, run_dir: Path, fd: int):
    self.run_dir = run_dir
    self.path = run_dir / LOCK_NAME
    self._fd = fd

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      if _same_file(self._fd, self.path):  # unlink while still holding it: no one can lock a removed file
        self.path.unlink()
    except OSError:
      pass  # the directory went away with the lock file; closing releases the lock anyway
    os.close(self._fd)
    self._fd = None
    _HELD.pop(_key(self.run_dir), None)


_HELD: dict[str, RunLock] = {}


def _key(run_dir: Path) -> str:
  return str(Path(run_dir).resolve())


def _same_file(fd: int, path: Path) -> bool:
  try:
    a, b = os.fstat(fd), os.stat(path)
  except FileNotFoundError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def holder(path: Path, wait_s: float = 0.5) -> str:
  """"pid P on HOST" from a lock file (waits briefly: a holder writes its pid just after locking)."""
  deadline = time.monotonic() + wait_s
  while True:
    try:
      text = Path(path).read_text().split()
    except OSError:
      text = []
    if text or time.monotonic() >= deadline:
      break
    time.sleep(0.02)
  if not text:
    return "pid unknown"
  return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")


def acquire(run_dir: str | os.PathLike) -> RunLock:
  """Takes the exclusive lock of ``run_dir`` (which must exist), or raises at once.

  Raises:
    RunLockedError: another live process holds it; the message names the directory and the holder.
  """
  run_dir = Path(run_dir)
  key = _key(run_dir)
  if key in _HELD:
    return _HELD[key]
  path = run_dir / LOCK_NAME
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC by default: a child never inherits it
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise RunLockedError(
          f"run directory {run_dir} is in use by another run ({holder(path)}, lock {path}); wait for it to "
          "finish or stop it (then --resume continues it), or choose another experiment name (--set name=...)"
      ) from None
    if _same_file(fd, path):
      break
    os.close(fd)  # its holder removed the file between our open and our lock: lock the one there now
  os.ftruncate(fd, 0)
  os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
  lock = RunLock(run_dir, fd)
  _HELD[key] = lock
  return lock
