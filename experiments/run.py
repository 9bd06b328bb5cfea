"""python -m experiments.run --config experiments/configs/fsdd_tiny.json [--set k=v ...] [--resume] [--dry-run]"""

from __future__ import annotations

import argparse
import sys


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
    cfg = config_lib.load(args.config, args.overrides)
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
