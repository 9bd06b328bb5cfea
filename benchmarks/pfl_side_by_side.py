"""The population round side by side with pfl-research's simulator, in one run, on the same workload shape.

  python3.11 -m venv .pflvenv && .pflvenv/bin/pip install torch==2.13.0 'pfl[pytorch]==0.6.0'
  python -m benchmarks.pfl_side_by_side --pfl-python .pflvenv/bin/python [--population 100000 --cohort 1000
      --rounds 3 --warmup 1 --out benchmarks/results/pfl_side_by_side]

pfl lives in its own environment: it pins dp-accounting < 0.6 and this project 0.6.0. Both sides: the config's
heads at fsdd_tiny widths (the same parameter count, printed), ``--population`` clients of which ``--cohort`` train
per round, each 2 local steps of batch 2 on rows drawn on demand from its id, starting from the global model with a
fresh local AdamW (stateless), FedAvg (server SGD at learning rate 1). This side: ``experiments.scaling
--population P --cohort M`` (``population_study``); pfl's: ``benchmarks/pfl_worker.py`` under ``--pfl-python``,
torch with as many threads as XLA's CPU client. The two run one after the other, never at once (the cores are
shared). Writes ``{out}/result.json`` and prints the two rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import experiments.scalestudy  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)

from experiments import scaling  # noqa: E402
from experiments.cli_errors import non_negative_int, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pfl-python", required=True, help="the Python of an environment with pfl[pytorch] installed")
  p.add_argument("--config", default="experiments/configs/fsdd_tiny.json")
  p.add_argument("--population", type=positive_int, default=100_000)
  p.add_argument("--cohort", type=positive_int, default=1_000)
  p.add_argument("--rounds", type=positive_int, default=3)
  p.add_argument("--warmup", type=non_negative_int, default=1)
  p.add_argument("--timeout-s", type=positive_int, default=3600, help="pfl's run is stopped after this long")
  p.add_argument("--out", default="benchmarks/results/pfl_side_by_side")
  args = p.parse_args(argv)
  if args.cohort > args.population:
    p.error(f"--cohort {args.cohort} is larger than the population {args.population}")
  if not Path(args.pfl_python).is_file():
    p.error(f"--pfl-python {args.pfl_python} is not a file (make the environment first, see --help)")
  return args


def pfl_spec(cfg, wl: dict, args: argparse.Namespace, threads: int) -> dict:
  """What the pfl worker builds: the same heads, workload and sampling."""
  from a2v_jax.models.heads import make_heads
  heads = make_heads(cfg, wl["target_shapes"])
  return {"feature_dim": wl["feature_dim"], "tokens": wl["tokens"], "target_shapes": wl["target_shapes"],
          "hidden": {b: list(heads.hidden[b]) for b in heads.branch_shapes}, "n_heads": heads.n_heads,
          "mlp_ratio": heads.mlp_ratio, "num_classes": 10, "samples_per_client": wl["samples_per_client"],
          "batch_size": wl["batch_size"], "pool": 65536, "population": args.population, "cohort": args.cohort,
          "rounds": args.rounds, "warmup": args.warmup, "seed": 0, "threads": threads,
          "learning_rate": cfg.train.clip_adapter_learning_rate}


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  scaling.reexec_with_allocator_env("benchmarks.pfl_side_by_side", argv)
  import jax
  import numpy as np
  from a2v_jax.models.heads import make_heads
  sargs = scaling.parse_args(["--config", args.config, "--population", str(args.population), "--cohort",
                              str(args.cohort), "--rounds", str(args.rounds), "--warmup", str(args.warmup),
                              "--batch-size", "2", "--local-steps", "2", "--epochs", "1"])
  cfg, extra = scaling.config_for(sargs)
  wl = scaling.workload_from_args(cfg, sargs, extra)
  heads = make_heads(cfg, wl["target_shapes"])
  shapes = jax.eval_shape(heads.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, wl["tokens"], wl["feature_dim"]),
                                                                                  np.float32))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  (row,) = scaling.population_study(cfg, [args.population], args.cohort, wl, client_state="stateless",
                                    rounds=args.rounds, warmup=args.warmup, reference=False)
  ours = {"backend": "a2v-jax population round", "jax": jax.__version__, "round_s": row["round_s"],
          "cpu_s_per_round": row["cpu_s_per_round"], "peak_rss_mb": row["peak_rss_mb"],
          "first_rounds_s": row["first_rounds_s"], "params": params}
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  threads = scaling.cpu_threads()
  with tempfile.TemporaryDirectory() as tmp:
    spec, result = Path(tmp) / "spec.json", Path(tmp) / "pfl.json"
    spec.write_text(json.dumps(pfl_spec(cfg, wl, args, threads)))
    print(f"pfl-research: population {args.population}, cohort {args.cohort}, {args.warmup} + {args.rounds} rounds "
          f"under {args.pfl_python}", flush=True)
    done = subprocess.run([args.pfl_python, str(ROOT / "benchmarks" / "pfl_worker.py"), str(spec), str(result)],
                          timeout=args.timeout_s)
    if done.returncode != 0:
      raise SystemExit(f"the pfl worker failed with exit status {done.returncode} (its output is above)")
    theirs = json.loads(result.read_text())
  summary = {"population": args.population, "cohort": args.cohort, "samples_per_client": wl["samples_per_client"],
             "batch_size": wl["batch_size"], "threads": threads, "rows": [ours, theirs],
             "pfl_over_ours": theirs["round_s"] / ours["round_s"]}
  (out / "result.json").write_text(json.dumps(summary, indent=2))
  for r in (ours, theirs):
    print(f"{r['backend']:28s} {r['round_s']:8.3f} s/round  peak RSS {r['peak_rss_mb']:7.0f} MB  "
          f"{r['params']} params")
  print(f"pfl-research takes {summary['pfl_over_ours']:.1f}x our time per round; wrote {out / 'result.json'}")
  return summary


if __name__ == "__main__":
  main()
