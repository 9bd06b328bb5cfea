"""``run_experiment(cfg)``: what ``python -m experiments.run`` runs for a config.

A config with ``adapter_load_checkpoint`` is a generate run (trained heads + generators, no training,
``generate.py``); every other config trains (``trainer.py``). The choice lives here, above both, so
neither module imports the other.
"""

from __future__ import annotations

from typing import Any, Optional

from a2v_jax.config import Config
from a2v_jax.run import generate, trainer
from a2v_jax.run.log import check_output_folders


def run_experiment(cfg: Config, *, resume: bool = False, verbose: bool = True,
                   prepared: Optional[trainer.Prepared] = None) -> dict[str, Any]:
  """Runs (or resumes) the experiment ``cfg`` describes; returns its summary (the run's summary.json)."""
  check_output_folders(cfg)
  if cfg.federation.adapter_load_checkpoint is not None:
    return generate.run_generate(cfg, resume=resume, verbose=verbose, prepared=prepared)
  return trainer.train_and_evaluate(cfg, resume=resume, verbose=verbose, prepared=prepared)
