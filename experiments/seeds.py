"""python -m experiments.seeds --config CFG [--seeds 0,1,2] [--set k=v ...]: one config at several seeds.

Why: on the default FSDD run single results move 2-4 points from seed to seed (500 test clips, one clip
is 0.2 points), so comparisons -- FedAvg against centralised, a tuning change -- are made on seed means
with their spread. Each seed is an ordinary run directory ``{name}_seed{S}``: a seed that finished
earlier with the same config is reused, an interrupted one is resumed (``--resume`` semantics), and one
that holds another config is refused, so rerunning the command after Ctrl-C, or with more seeds, never
retrains or overwrites what exists. Writes ``{output_dir}/{name}_seeds.json`` and ``.csv`` and prints
a table of the server's test metrics (final round and best-by-validation round): each seed, mean, std.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from a2v_jax.errors import A2VError

SECTIONS = ("final", "best_by_val")


class SeedRunError(A2VError, RuntimeError):
  """A seed's run directory holds a run of another config."""


def parse_seeds(text: str) -> list[int]:
  """'0,1,2' -> [0, 1, 2] (distinct non-negative integers, in the order given)."""
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise argparse.ArgumentTypeError(f"--seeds must list distinct integers >= 0, got {text!r}")
  return seeds


def run_seed(cfg, verbose: bool = True) -> dict[str, Any]:
  """The summary of ``cfg``'s run: reused when finished with this config, resumed when interrupted."""
  from a2v_jax.run.experiment import run_experiment
  from a2v_jax.run.log import run_dir_for
  from a2v_jax.checkpoint import config_differences
  run_dir = run_dir_for(cfg)
  saved_cfg, summary = run_dir / "config.json", run_dir / "summary.json"
  if saved_cfg.is_file():
    diffs = config_differences(json.loads(saved_cfg.read_text()), cfg.to_dict())
    if diffs:
      raise SeedRunError(f"{run_dir} holds a run of another config ({'; '.join(diffs)}); choose another name "
                         "(--set name=...) so nothing is overwritten")
  if summary.is_file():
    done = json.loads(summary.read_text())
    if done.get("rounds") == cfg.federation.global_rounds:
      if verbose:
        print(f"seed {cfg.experiment.seed}: finished earlier, reusing {run_dir}")
      return done
  resume = (run_dir / "metrics.jsonl").is_file()
  if verbose:
    print(f"seed {cfg.experiment.seed}: {'resuming' if resume else 'training'} {run_dir}")
  return run_experiment(cfg, resume=resume, verbose=verbose)


def spread(summaries: Mapping[int, Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
  """Per section and server test metric: the seeds' values, mean, std (ddof 1; 0 for one seed), min, max.

  Only metrics every seed has are kept (a seed without a best-by-validation round drops that section).
  """
  out: dict[str, dict[str, dict[str, Any]]] = {}
  for section in SECTIONS:
    rows = [s.get(section) for s in summaries.values()]
    if not rows or any(r is None for r in rows):
      continue
    keys = [k for k in rows[0] if k.startswith("test/server/") and k.endswith("_on_test")
            and all(k in r for r in rows)]
    if section == "best_by_val":
      keys = ["round"] + keys
    table = {}
    for k in keys:
      v = np.asarray([float(r[k]) for r in rows], np.float64)
      table[k.removeprefix("test/server/")] = {
          "seeds": dict(zip(map(str, summaries), v.tolist())), "mean": float(v.mean()),
          "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()), "max": float(v.max())}
    out[section] = table
  return out


def write(result: dict[str, Any], stem: Path) -> None:
  """``stem``.json (everything) and ``stem``.csv (one row per section and metric)."""
  from a2v_jax.checkpoint import write_json_atomic
  write_json_atomic(stem.with_suffix(".json"), result)
  seeds = [str(s) for s in result["seeds"]]
  tmp = stem.with_suffix(".csv.tmp")
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["section", "metric"] + [f"seed_{s}" for s in seeds] + ["mean", "std", "min", "max"])
    for section, table in result["spread"].items():
      for metric, st in table.items():
        w.writerow([section, metric] + [st["seeds"][s] for s in seeds] + [st["mean"], st["std"], st["min"], st["max"]])
  tmp.replace(stem.with_suffix(".csv"))


def print_table(result: dict[str, Any]) -> None:
  seeds = [str(s) for s in result["seeds"]]
  head = f"{'':>34}" + "".join(f"{'seed ' + s:>10}" for s in seeds) + f"{'mean':>10}{'std':>9}"
  for section, table in result["spread"].items():
    print(f"{section} (server, test split):\n{head}")
    for metric, st in table.items():
      d = 1 if metric == "round" else 4
      print(f"  {metric:<32}" + "".join(f"{st['seeds'][s]:>10.{d}f}" for s in seeds)
            + f"{st['mean']:>10.{d}f}{st['std']:>9.{d}f}")


def main(argv=None) -> int:
  """Exit status: 0 done, 2 refused or stopped (config, data, a seed's run failing with a project error, another
  config in a seed's run directory, ...): one message, no traceback (``experiments.cli_errors``)."""
  from experiments.cli_errors import guard
  p = argparse.ArgumentParser(description="One config at several seeds: runs (or reuses) each, then mean and spread.")
  p.add_argument("--config", "-c", help="JSON config (ours, or reference-sectioned)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, as in experiments.run (repeatable)")
  p.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
  p.add_argument("--quiet", action="store_true", help="no per-run output, only the final table")
  args = p.parse_args(argv)
  return guard(lambda: _run(args),
               interrupted="rerun the same command to continue (finished seeds are reused, the interrupted one "
                           "resumes from its last checkpoint)")


def _run(args: argparse.Namespace) -> int:
  from a2v_jax.reference.config import load_config
  base = load_config(args.config, args.overrides)
  name = base.experiment.name
  summaries = {}
  for s in args.seeds:
    cfg = load_config(args.config, args.overrides + [f"seed={s}", f"name={json.dumps(f'{name}_seed{s}')}"])
    summaries[s] = run_seed(cfg, verbose=not args.quiet)
  result = {"name": name, "seeds": args.seeds, "config": base.to_dict(),
            "run_dirs": {str(s): summ.get("run_dir") for s, summ in summaries.items()},
            "spread": spread(summaries)}
  stem = Path(base.experiment.output_dir) / f"{name}_seeds"
  write(result, stem)
  print_table(result)
  print(f"written {stem}.json, {stem}.csv")
  return 0


if __name__ == "__main__":
  sys.exit(main())
