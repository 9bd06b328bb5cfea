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


def main(argv=None) -> int:
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
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  if not args.quiet:
    print("resolved config:\n" + config_lib.dumps(cfg))
  if args.dry_run:
    from a2v_jax.plan import print_plan
    return print_plan(cfg)
  from a2v_jax.trainer import train_and_evaluate
  train_and_evaluate(cfg, resume=args.resume, verbose=not args.quiet)
  return 0


if __name__ == "__main__":
  sys.exit(main())
