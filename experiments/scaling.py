"""Many-client scaling study: the vmapped JAX round against the sequential torch reference.

  python -m experiments.scaling --config experiments/configs/fsdd_tiny.json --clients 1,10,100,1000 \
      [--rounds 3 --warmup 1 --samples-per-client N --local-steps 2 --batch-size 2 --epochs 1 --tokens T \
       --feature-dim D --preset config|reference --baseline torch|none|both --yardstick \
       --memory-budget-gb G --chunk K --out benchmarks/results/scaling]
  python -m experiments.scaling --preset reference --largest-within-gb 24   # compile-only memory fit
  python -m experiments.scaling --population 1000,10000,100000,1000000 --cohort 1000 [--client-state persistent
      --store-dir DIR]   # cross-device: a round trains a cohort drawn from the population

Per client count C, every client holds N synthetic samples (cached-feature shaped: T tokens of the
config's AST width, no backbone needed) and trains E local epochs of ceil(N / B) steps with the config's
heads (``make_heads``) and engine (``fed_a2v``). The memory plan (``a2v_jax.federated.memory``) is checked, and the
round compiled, before any client state is allocated. After ``--warmup`` rounds, ``--rounds`` rounds are
timed, interleaved with the baselines' rounds (the machine is shared; its load drifts). Per point: rounds/s,
samples/s, wall and process-CPU seconds, lowering and compile time (which must not grow with C), peak host
RSS (a sampling thread), device peak memory when the backend reports it, bytes per client, the memory plan
and XLA's buffer figure, and analytic training FLOP/s. ``--baseline torch`` times the sequential torch
reference (``a2v_jax.reference.torch_baseline``: one model copy and AdamW per branch per client, FedAvg of
state dicts) on the same data, from the same initial weights, in the same process; ``both`` adds the
reference's AST forward of every sample in every epoch; ``--yardstick`` times, between the rounds, a plain
2048^3 matmul (backend ``matmul``) and the plain dots of one client step's own shapes (``matmul@step``: what
plain matmuls reach at these widths). torch gets as many intra-op threads as the JAX CPU client (the cores we
may use).

The CLI restarts itself once with ``ALLOCATOR_ENV`` (glibc settings that keep XLA's freed buffers mapped;
see there) unless ``--system-allocator`` is given.

With ``--population``, each round samples ``--cohort`` clients of the population (``federated/population.py``):
their rows are drawn on demand from their ids, their states come from a host store (``persistent``) or from the
global model (``stateless``), and only they are on the device; the first row is the full-participation round of
``--cohort`` clients for comparison. (``--clients C`` is population = cohort = C.)

Writes ``scaling.csv``, ``scaling.jsonl`` and ``scaling.png`` (time per round vs C, log-log) to ``--out``.

This module is the CLI; the parts live in ``experiments.scalestudy`` (workload, runners, timing, report)
and are re-exported here for the benchmarks and tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import experiments.scalestudy  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)

import jax  # noqa: E402

from a2v_jax import config as config_lib  # noqa: E402
from a2v_jax.federated import memory  # noqa: E402
from a2v_jax.config import Config  # noqa: E402
from experiments.scalestudy.report import table, write_outputs  # noqa: E402
from experiments.scalestudy.runners import (JaxRunner, MatmulRunner, PeakRSS, StepShapesMatmulRunner,  # noqa: E402,F401
                                            TorchRunner)
from experiments.scalestudy.timing import largest_clients, population_study, study, time_point  # noqa: E402,F401
from experiments.scalestudy.workload import (REFERENCE_PRESET, REFERENCE_SHAPES, Data, Workload,  # noqa: E402,F401
                                             cpu_threads, dense_shapes, forward_flops_per_sample, replicated_init,
                                             round_data, synthetic_data, train_flops_per_round, workload_dims)
from experiments.cli_errors import non_negative_int, positive_float, positive_int  # noqa: E402

# glibc returns every large buffer to the kernel when it is freed, so each round of the JAX program
# page-faults its ~GB of XLA temporaries in again (measured: 480 k minor faults and 0.9 s of system
# time per 1000-client round, a third of the round). One arena that never unmaps or trims keeps them.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def reexec_with_allocator_env(module: str, argv: Sequence[str]) -> None:
  """Restarts ``python -m module argv`` with ``ALLOCATOR_ENV`` (glibc reads it only at start-up)."""
  if not sys.platform.startswith("linux") or all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
    return
  env = dict(os.environ, **ALLOCATOR_ENV)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def client_counts(text: str) -> list[int]:
  """``--clients``: positive integers, comma-separated (argparse turns the ValueError into a usage line)."""
  try:
    counts = [int(c) for c in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated client counts, e.g. 1,10,100; got {text!r}") from None
  if not counts or min(counts) < 1:
    raise argparse.ArgumentTypeError(f"client counts must be >= 1, got {text!r}")
  return counts


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="experiments/configs/fsdd_tiny.json")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
  p.add_argument("--clients", type=client_counts, default=client_counts("1,10,100,1000"),
                 help="comma-separated client counts")
  p.add_argument("--rounds", type=positive_int, default=3)
  p.add_argument("--warmup", type=non_negative_int, default=1)
  p.add_argument("--samples-per-client", type=positive_int, default=None, help="default: local steps x batch size")
  p.add_argument("--local-steps", type=positive_int, default=2, help="steps per epoch when --samples-per-client is unset")
  p.add_argument("--batch-size", type=positive_int, default=None, help="default: the config's")
  p.add_argument("--epochs", type=positive_int, default=None, help="local epochs; default: the config's")
  p.add_argument("--tokens", type=positive_int, default=None, help="default: the config's AST length")
  p.add_argument("--feature-dim", type=positive_int, default=None, help="default: the config's AST width")
  p.add_argument("--preset", choices=["config", "reference"], default="config",
                 help="reference: the reference's head widths and shapes (768 -> clip 768, t5 17x4096)")
  p.add_argument("--baseline", choices=["torch", "none", "both"], default="torch")
  p.add_argument("--memory-budget-gb", type=positive_float, default=None, help="default: 90%% of what is available")
  p.add_argument("--chunk", type=positive_int, default=None, help="client_chunk_size (default: the plan's choice)")
  p.add_argument("--largest-within-gb", type=positive_float, default=None,
                 help="only report the largest client count whose compiled round fits this many GiB")
  p.add_argument("--yardstick", action="store_true", help="time a 2048^3 matmul and plain dots of the step's shapes between the rounds")
  p.add_argument("--system-allocator", action="store_true",
                 help="keep glibc's default malloc settings (no restart with ALLOCATOR_ENV)")
  p.add_argument("--population", type=client_counts, default=None,
                 help="comma-separated population sizes: each round trains --cohort clients drawn from it")
  p.add_argument("--cohort", type=positive_int, default=None, help="clients per round with --population")
  p.add_argument("--client-state", choices=["stateless", "persistent"], default="stateless",
                 help="with --population: a participant starts from the global model (stateless) or from its own "
                      "state kept in a host store (persistent)")
  p.add_argument("--store-dir", default=None, help="persistent: keep the store in memmap files under this folder")
  p.add_argument("--out", default="benchmarks/results/scaling")
  args = p.parse_args(argv)
  if (args.population is None) != (args.cohort is None):
    p.error("--population and --cohort go together")
  if args.population is not None and args.cohort > min(args.population):
    p.error(f"--cohort {args.cohort} is larger than the population {min(args.population)}")
  if args.population is None and (args.client_state != "stateless" or args.store_dir):
    p.error("--client-state and --store-dir apply to --population runs")
  return args


def config_for(args: argparse.Namespace) -> tuple[Config, dict]:
  # The torch baseline is the reference's plain FedAvg (sgd(1.0) on the mean delta, plain local loss): the
  # study runs that on both sides, whatever the config's server optimiser or drift correction.
  overrides = ["server_optimizer=\"sgd\"", "server_learning_rate=1.0", "server_momentum=0.0",
               "local_drift_correction=\"none\"", *args.set]
  extra: dict[str, Any] = {}
  if args.preset == "reference":
    overrides += [f"{k}={json.dumps(v)}" for k, v in REFERENCE_PRESET.items()]
    extra = {"feature_dim": args.feature_dim or REFERENCE_SHAPES["feature_dim"],
             "target_shapes": {"clip": REFERENCE_SHAPES["clip"], "t5": REFERENCE_SHAPES["t5"]}}
  return config_lib.load(args.config, overrides), extra


def workload_from_args(cfg: Config, args: argparse.Namespace, extra: dict) -> dict[str, Any]:
  """The per-client workload fields (everything but C) the CLI arguments describe."""
  width, t_cfg, shapes = workload_dims(cfg)
  b = args.batch_size or cfg.train.batch_size
  return dict(samples_per_client=args.samples_per_client or args.local_steps * b, batch_size=b,
              local_epochs=args.epochs or cfg.train.local_epochs, tokens=args.tokens or t_cfg,
              feature_dim=extra.get("feature_dim", args.feature_dim) or width,
              target_shapes=dict(extra.get("target_shapes") or shapes))


def largest_for_args(cfg: Config, args: argparse.Namespace, extra: dict) -> dict[str, Any]:
  wl = workload_from_args(cfg, args, extra)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=wl["batch_size"],
                                                           local_epochs=wl["local_epochs"]))
  budget = int(args.largest_within_gb * memory.GiB)
  how = "all at once" if args.chunk is None else f"client_chunk_size={args.chunk}"
  print(f"largest client count within {memory.gib(budget)} ({args.preset} heads, {wl['tokens']} tokens x "
        f"{wl['feature_dim']}, batch {wl['batch_size']}, {cfg.experiment.param_dtype}, {how}):")
  c = largest_clients(cfg, budget, chunk=args.chunk, **wl)
  print(f"largest client count: {c}")
  return {"largest_clients": c, "budget_bytes": budget, "chunk": args.chunk,
          **{k: v for k, v in wl.items() if k != "target_shapes"}}


def main(argv=None) -> list[dict[str, Any]]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if not args.system_allocator:
    reexec_with_allocator_env("experiments.scaling", argv)
  cfg, extra = config_for(args)
  clients = args.clients
  budget = int(args.memory_budget_gb * memory.GiB) if args.memory_budget_gb else None
  if args.largest_within_gb:
    return [largest_for_args(cfg, args, extra)]
  if args.population is not None:
    rows = population_study(cfg, args.population, args.cohort, workload_from_args(cfg, args, extra),
                            client_state=args.client_state, rounds=args.rounds, warmup=args.warmup,
                            store_dir=args.store_dir)
  else:
    rows = study(cfg, clients, workload_from_args(cfg, args, extra), rounds=args.rounds, warmup=args.warmup,
                 baseline=args.baseline, budget=budget, chunk=args.chunk, yardstick=args.yardstick)
  meta = {"argv": vars(args), "threads": cpu_threads(), "allocator_env": {k: os.environ.get(k) for k in ALLOCATOR_ENV},
          "jax": jax.__version__, "device": str(jax.devices()[0]),
          "title": f"{cfg.experiment.name} ({args.preset} heads), {cpu_threads()} CPU threads"}
  write_outputs(rows, Path(args.out), meta)
  print(table(rows))
  print(f"wrote {args.out}/scaling.csv, scaling.jsonl, scaling.png")
  return rows


def cli(argv=None) -> int:
  """``python -m experiments.scaling``: exit 0, or 2 with one message on a project error (bad config, ...)."""
  from experiments.cli_errors import guard
  return guard(lambda: main(argv), interrupted="the study stopped; the results of finished client counts are "
                                               "not written (rerun with fewer --clients)")


if __name__ == "__main__":
  sys.exit(cli())
