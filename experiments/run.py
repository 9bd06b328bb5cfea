"""python -m experiments.run --config experiments/configs/fsdd_tiny.json [--set k=v ...] [--resume] [--dry-run]"""

from __future__ import annotations

import argparse
import sys


def _load(config_lib, path, overrides):
  """Our config format, or a reference fedgfe JSON (``feda2v`` / ``nodes`` sections) translated."""
  import json
  from pathlib import Path
  raw = None
  if path is not None and Path(path).is_file():
    try:
      raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
      raw = None  # config_lib.load reports it
  if isinstance(raw, dict) and ("feda2v" in raw or isinstance(raw.get("nodes"), list)):
    from a2v_jax.reference_config import read_reference_config
    flat, warnings, nodes = read_reference_config(path)
    for w in warnings:
      print(f"reference config: {w}", file=sys.stderr)
    flat.update(partition="reference", reference_nodes=nodes, num_nodes=len(nodes))
    for item in overrides:
      key, value = config_lib.parse_override(item)
      flat[key.split(".")[-1]] = value
    return config_lib.from_dict(flat, where=str(path))
  return config_lib.load(path, overrides)


def _startup_errors() -> tuple[type[BaseException], ...]:
  """The project's errors that mean "this run cannot start (or go on) as configured".

  Each carries a message written for the user (what was found, what was expected), so the CLI prints
  that message alone instead of a traceback. Anything else is a bug and still raises.
  """
  from a2v_jax import config, features, generator_checkpoint, run_log
  from a2v_jax.backbones.hf import BackboneLoadError
  from a2v_jax.checkpoint import CheckpointError
  from a2v_jax.data.audio import AudioError
  from a2v_jax.data.partition import PartitionError
  from a2v_jax.data.registry import DatasetError
  from a2v_jax.federated.generator_runs import GeneratorRunError
  from a2v_jax.trainer import TrainingError
  from a2v_jax.wandb_sink import WandbMissingError
  return (config.ConfigError, DatasetError, PartitionError, AudioError, features.FeatureError, BackboneLoadError,
          WandbMissingError, CheckpointError, generator_checkpoint.GeneratorCheckpointError, GeneratorRunError,
          run_log.RunDirError, TrainingError, FileNotFoundError)


def _label(e: BaseException) -> str:
  from a2v_jax.config import ConfigError
  from a2v_jax.generator_checkpoint import GeneratorCheckpointError
  if isinstance(e, ConfigError):
    return "config error"
  if isinstance(e, GeneratorCheckpointError):
    return "generator checkpoint error"
  return f"error ({type(e).__name__})"


def main(argv=None) -> int:
  """Runs the CLI; returns the exit status (0 done, 2 refused or stopped with a stated reason).

  Start-up problems (config, data, backbones, missing / partial / corrupt / mismatched checkpoints, an
  existing run directory) and a run stopped on purpose (non-finite loss) print one message on stderr
  and return 2, without a traceback: the message is the whole story. Unexpected exceptions raise.
  """
  p = argparse.ArgumentParser(description="Federated audio-to-visual training (a2v-jax).")
  p.add_argument("--config", "-c", help="JSON config (ours, or reference-sectioned)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config key (JSON value), e.g. --set global_rounds=3")
  p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
  p.add_argument("--dry-run", action="store_true", help="validate config and data, print the plan, exit")
  p.add_argument("--quiet", action="store_true")
  args = p.parse_args(argv)

  from a2v_jax import config as config_lib
  try:
    cfg = _load(config_lib, args.config, args.overrides)
    if not args.quiet:
      print("resolved config:\n" + config_lib.dumps(cfg))
    if args.dry_run:
      from a2v_jax.plan import print_plan
      return print_plan(cfg)
    from a2v_jax.trainer import train_and_evaluate
    train_and_evaluate(cfg, resume=args.resume, verbose=not args.quiet)
  except _startup_errors() as e:
    sys.stdout.flush()
    print(f"{_label(e)}: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    sys.stdout.flush()
    print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
