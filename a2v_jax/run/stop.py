"""Stopping a run on SIGTERM or SIGINT at a round boundary: the round's checkpoint saved, every process at the
same round, one line, a stated exit status.

Why at a round boundary: a scheduler's SIGTERM (preemption, ``scancel``, a wall-clock limit) is followed by
SIGKILL some seconds later; dying at once loses every round since the last checkpoint, and in a multi-process
job a process that stops alone leaves its peers blocked in a collective. So the first signal only records a
request; the round in flight finishes, is logged and checkpointed (whatever ``checkpoint_frequency`` says),
and the run ends with :class:`Stopped` ("stopped by SIGTERM at round R; --resume continues"). A second
signal of the same kind acts as it normally would (Ctrl-C twice interrupts at once).

Across processes the processes must agree on the round. JAX's preemption service (on by default with
``jax.distributed``) already catches SIGTERM in every process and runs the agreement protocol:
``multihost_utils.reached_preemption_sync_point(round)`` turns True on every process at the same round. So a
multi-process run leaves SIGTERM to JAX and only turns SIGINT into a SIGTERM to itself, which JAX then
propagates; one process alone uses its own handlers.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Optional

import jax

from a2v_jax.errors import A2VError

EXIT_STATUS = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}  # 143, 130: the shell's own


class Stopped(A2VError, RuntimeError):
  """The run stopped on a signal after saving a round; ``--resume`` continues it."""

  def __init__(self, signal_name: str, round_: int):
    super().__init__(f"stopped by {signal_name} at round {round_}; the round is checkpointed and --resume continues")
    self.signal_name = signal_name
    self.round = round_
    self.exit_status = EXIT_STATUS.get(signal_name, 128 + signal.SIGTERM)


class StopRequests:
  """A context in which SIGTERM / SIGINT request a stop at the next round boundary instead of ending the process.

  ``should_stop(round)`` must be called once per round by every process of the job, with the same rounds.
  """

  def __init__(self) -> None:
    self.received: Optional[str] = None
    self._previous: dict[int, object] = {}
    self._multi = jax.process_count() > 1

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is not threading.main_thread():
      return self  # only the main thread may install handlers (e.g. a run driven by a server framework)
    signals = [signal.SIGINT] if self._multi else [signal.SIGTERM, signal.SIGINT]
    for s in signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
    name = signal.Signals(signum).name
    if self.received == name:  # the second time: what the signal normally does
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      os.kill(os.getpid(), signum)
      return
    self.received = name
    print(f"\n{name} received: finishing this round, saving it, then stopping (send it again to stop at once)",
          flush=True)
    if self._multi:  # JAX's preemption service handles SIGTERM and tells the other processes
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, round_: int) -> bool:
    """Whether the run stops after ``round_`` (the same answer on every process of the job)."""
    if self._multi:
      from jax.experimental import multihost_utils
      stop = multihost_utils.reached_preemption_sync_point(round_)
      if stop and self.received is None:
        self.received = "SIGTERM"  # delivered to another process, or to this one through JAX's handler
      return stop
    return self.received is not None
