"""Optional wandb mirror of the run log (``wandb: true``), offline by default.

The run directory's ``metrics.jsonl`` stays the record; wandb only mirrors it, under the same metric
names as the reference (``test/server/...``, ``test/node_{i}/...``, ``train/node_{i}/...``) so existing
dashboards keep working. Offline mode is the default because the clusters our users run on often
have no outbound network; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads later. Set
``WANDB_MODE=online`` to log live. wandb is not a dependency: asking for it without it installed is a
clear error at start-up, before any training.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional

from a2v_jax.errors import A2VError


class WandbMissingError(A2VError, RuntimeError):
  """``wandb: true`` but the wandb package is not installed."""


class WandbSink:
  """Forwards every logged round (and the final summary) to a wandb run."""

  def __init__(self, run: Any):
    self._run = run

  def log(self, row: dict[str, Any]) -> None:
    self._run.log({k: v for k, v in row.items() if k != "round"}, step=int(row["round"]))

  def finish(self, summary: dict[str, Any]) -> None:
    for k, v in summary.get("final", {}).items():
      self._run.summary[k] = v
    self._run.finish()


def open_sink(cfg, run_dir: Path, *, resume: bool) -> Optional[WandbSink]:
  """A sink when the config asks for wandb, else None; resumes the same wandb run id on ``--resume``.

  ``run_dir`` must exist (``RunLog`` creates it); wandb writes its offline run under it.
  """
  if not cfg.experiment.wandb:
    return None
  try:
    wandb = importlib.import_module("wandb")
  except ImportError as e:
    raise WandbMissingError(
        "wandb: true, but the wandb package is not installed; `pip install wandb` (or set wandb: false: "
        "metrics.jsonl / metrics.csv in the run directory hold the same numbers)") from e
  run = wandb.init(project="a2v-jax", name=cfg.experiment.name, id=f"{cfg.experiment.name}-{cfg.hash()[:8]}",
                   dir=str(run_dir), config=cfg.to_dict(), mode=os.environ.get("WANDB_MODE", "offline"),
                   resume="allow" if resume else None)
  return WandbSink(run)
