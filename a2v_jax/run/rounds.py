"""The one round loop: every run that trains in rounds (heads, Run 1 generators, generator-only) goes through it.

A run is a list of stages. Each stage is ``stage(carry, round) -> (carry, row entries)``: it takes the run's
state of this round (``carry``, whatever the run keeps: heads, generators, the shared inputs) and returns the
new state and what it adds to the round's metrics row. The loop owns what every run must do the same way:
the progress bar, ``round_seconds`` (the training stages only, not evaluation or outputs), one row per round
in the run log (and the wandb sink), and the checkpoint hook after the row is written -- so a resumed run
logs exactly the rows a straight run logs, whatever stages it holds. SIGTERM / SIGINT during the rounds end the
run after the round in flight, checkpointed (``run/stop.py``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

from tqdm.auto import tqdm

from a2v_jax.run.log import RunLog
from a2v_jax.run.stop import StopRequests, Stopped

Stage = Callable[[Any, int], tuple[Any, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Rounds:
  """What a run does each round.

  train: stages timed as the round (``round_seconds``), in order.
  report: stages after the timing (evaluation, embeddings and renders), in order.
  save: ``save(carry, round, force)`` after the round's row is logged (checkpoints; it decides whether to
    write, and writes when ``force``: the run stops after this round).
  """
  train: Sequence[Stage]
  report: Sequence[Stage] = ()
  save: Callable[[Any, int, bool], None] = lambda carry, round_, force: None


def run_rounds(carry: Any, rounds: Rounds, *, start: int, last: int, log: RunLog, sink: Optional[Any] = None,
               verbose: bool = True) -> tuple[Any, list[float]]:
  """Rounds ``start + 1 .. last``; returns the final carry and each round's training seconds.

  Raises:
    Stopped: SIGTERM or SIGINT arrived; the round in flight was finished, logged and saved.
  """
  times: list[float] = []
  bar = tqdm(range(start + 1, last + 1), desc="rounds", unit="round", disable=not verbose)
  with StopRequests() as stop:
    for r in bar:
      t0 = time.time()
      row: dict[str, Any] = {"round": r, "round_seconds": None}
      for stage in rounds.train:
        carry, part = stage(carry, r)
        row.update(part)
      times.append(time.time() - t0)
      row["round_seconds"] = round(times[-1], 4)
      for stage in rounds.report:
        carry, part = stage(carry, r)
        row.update(part)
      log.append(row)
      if sink is not None:
        sink.log(row)
      bar.set_postfix_str(log.short(row))
      stopping = stop.should_stop(r) and r < last
      rounds.save(carry, r, stopping)
      if stopping:
        bar.close()
        log.close()
        raise Stopped(stop.received, r)
  bar.close()
  return carry, times


def mean_after_first(times: Sequence[float]) -> Optional[float]:
  """Mean round time without the first (compiling) round; None with fewer than two rounds."""
  return float(sum(times[1:]) / len(times[1:])) if len(times) > 1 else None
