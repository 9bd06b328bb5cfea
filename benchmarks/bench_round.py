"""Round benchmarks against the project's targets, both sides timed in the same run (not tests).

  python -m benchmarks.bench_round [--case a,b,b-wide,compile] [--rounds 2] [--out benchmarks/results/bench_round]

Cases (issue #7):
  a        cross-device: 1000 clients x 2 local steps of batch 2, short token sequences (the config's pooled
           length). Target: >= 10x the rounds/s of the sequential torch reference.
  b        cross-silo: 100 clients x 5 steps x batch 8 x 146 tokens, the config's heads. Targets: local
           training FLOP rate >= 60 % of the matmul rate measured between the same rounds with plain fp32
           ``jnp.dot``s, both of 2048^3 and of one client step's own shapes (the issue's "plain jnp.dot of
           similar shapes"), each judged; and >= 2x the torch reference (also timed: torch with the
           reference's AST forward per epoch).
  b-wide   case b (50 clients, to stay within ~5 minutes) with heads whose matmuls are wide enough to be
           compute-bound (768-wide features, as the real AST; adapters 768 -> 256 -> 256 -> 128): shows how
           the FLOP fraction and the torch ratio depend on the widths.
  compile  compile time of the round for 1 .. 10 000 clients (compiles only; nothing is allocated).

FLOPs are counted analytically (matmuls, forward + 2x for backward, real samples only; see
``experiments.scaling.forward_flops_per_sample``); XLA's own count of one client step is recorded beside it.
The machine is shared: rounds of every backend and of the matmul yardsticks are interleaved, and process
CPU seconds are reported beside wall seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from experiments import scaling  # sets OMP_WAIT_POLICY before torch is imported

import jax  # noqa: E402  (after experiments.scaling)
import jax.numpy as jnp  # noqa: E402

from a2v_jax import config as config_lib  # noqa: E402
from a2v_jax.federated import memory  # noqa: E402
from experiments.cli_errors import non_negative_int, positive_int  # noqa: E402

WIDE = {"overrides": ["clip_adapter_hidden=[256,256]", "t5_adapter_hidden=[256,256]", "map_mlp_ratio=2"],
        "feature_dim": 768, "target_shapes": {"clip": (128,), "t5": (17, 128)}}

CASES: dict[str, dict[str, Any]] = {
    "a": {"title": "cross-device: 1000 clients x 2 steps x batch 2, short sequences", "clients": [1000],
          "workload": {"samples_per_client": 4, "batch_size": 2, "local_epochs": 1},
          "targets": {"speedup_vs_torch": 10.0}},
    "b": {"title": "cross-silo: 100 clients x 5 steps x batch 8 x 146 tokens", "clients": [100],
          "workload": {"samples_per_client": 40, "batch_size": 8, "local_epochs": 1, "tokens": 146},
          "targets": {"fraction_of_matmul": 0.6, "fraction_of_step_matmul": 0.6, "speedup_vs_torch": 2.0},
          "baseline": "both"},
    "b-wide": {"title": "cross-silo, wide heads (768 -> 256 -> 256 -> 128), 50 clients", "clients": [50], **WIDE,
               "workload": {"samples_per_client": 40, "batch_size": 8, "local_epochs": 1, "tokens": 146},
               "targets": {"fraction_of_matmul": 0.6, "fraction_of_step_matmul": 0.6, "speedup_vs_torch": 2.0}},
}


def _workload(cfg, case: dict[str, Any]) -> dict[str, Any]:
  width, tokens, shapes = scaling.workload_dims(cfg)
  wl = {"tokens": tokens, "feature_dim": case.get("feature_dim", width),
        "target_shapes": case.get("target_shapes", shapes)}
  wl.update(case["workload"])
  return wl


def xla_step_flops(cfg, wl: dict[str, Any]) -> float:
  """XLA's FLOP count of one client's training step (value_and_grad + AdamW), for cross-checking."""
  import optax

  from a2v_jax.federated import optim
  from a2v_jax.models.heads import make_heads
  heads = make_heads(cfg, wl["target_shapes"])
  x = jnp.zeros((wl["batch_size"], wl["tokens"], wl["feature_dim"]))
  y = {b: jnp.zeros((wl["batch_size"],) + tuple(s)) for b, s in wl["target_shapes"].items()}
  params = jax.eval_shape(heads.init, jax.random.PRNGKey(0), x[:1])["params"]
  tx = optim.client_optimizer(cfg)

  def step(p, o):
    loss = lambda q: sum(jnp.mean(jnp.square(v - y[b])) for b, v in heads.apply({"params": q}, x).items())
    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  cost = jax.jit(step).lower(params, jax.eval_shape(tx.init, params)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan")))


def run_case(name: str, rounds: int, warmup: int, log=print) -> dict[str, Any]:
  case = CASES[name]  # (main checked the name)
  cfg = config_lib.load(case.get("config", "experiments/configs/fsdd_tiny.json"), case.get("overrides", []))
  wl = _workload(cfg, case)
  log(f"== case {name}: {case['title']}")
  rows = scaling.study(cfg, case["clients"], wl, rounds=rounds, warmup=warmup, baseline=case.get("baseline", "torch"),
                       yardstick=True, log=log)
  by = {r["backend"]: r for r in rows}
  jx, tr, mm, ms = by["jax"], by["torch"], by["matmul"], by["matmul@step"]
  cfg_b = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=wl["batch_size"]))
  steps = -(-wl["samples_per_client"] // wl["batch_size"]) * wl["local_epochs"] * case["clients"][0]
  result = {
      "case": name, "title": case["title"], "workload": {k: v for k, v in wl.items() if k != "target_shapes"},
      "target_shapes": {k: list(v) for k, v in wl["target_shapes"].items()}, "rows": rows,
      "speedup_vs_torch": tr["round_s"] / jx["round_s"],
      "speedup_vs_torch_cpu_time": tr["cpu_s_per_round"] / jx["cpu_s_per_round"],
      "matmul_gflop_s": mm["train_gflop_s"], "jax_gflop_s": jx["train_gflop_s"],
      "fraction_of_matmul": jx["train_gflop_s"] / mm["train_gflop_s"],
      "fraction_of_matmul_cpu_time": jx["train_gflop_per_cpu_s"] / mm["train_gflop_per_cpu_s"],
      "step_matmul_gflop_s": ms["train_gflop_s"],
      "fraction_of_step_matmul": jx["train_gflop_s"] / ms["train_gflop_s"],
      "fraction_of_step_matmul_cpu_time": jx["train_gflop_per_cpu_s"] / ms["train_gflop_per_cpu_s"],
      "torch_gflop_s": tr["train_gflop_s"],
      "speedup_vs_torch_ast": by["torch+ast"]["round_s"] / jx["round_s"] if "torch+ast" in by else None,
      "analytic_gflop_per_round": jx["train_gflop_per_round"],
      "xla_gflop_per_round": xla_step_flops(cfg_b, wl) * steps / 1e9,
      "targets": case["targets"], "loadavg_1min": jx["loadavg_1min"],
  }
  # Judged on the smaller of the wall-time and CPU-time ratios: under a loaded machine either can flatter.
  judged = {"speedup_vs_torch": min(result["speedup_vs_torch"], result["speedup_vs_torch_cpu_time"]),
            **{k: min(result[k], result[k + "_cpu_time"]) for k in ("fraction_of_matmul", "fraction_of_step_matmul")}}
  result["judged"] = judged
  result["met"] = {k: judged[k] >= v for k, v in case["targets"].items()}
  return result


def compile_scaling(counts=(1, 10, 100, 1000, 10000), log=print) -> list[dict[str, Any]]:
  """Lowering and compile time of the round for each client count (nothing is allocated)."""
  cfg = config_lib.load("experiments/configs/fsdd_tiny.json")
  wl = _workload(cfg, {"workload": {"samples_per_client": 4, "batch_size": 2, "local_epochs": 1}})
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=2, local_epochs=1))
  out = []
  for c in counts:
    w = scaling.Workload(num_clients=c, pool_cap=64, **wl)
    t = time.perf_counter()
    run = scaling.JaxRunner(cfg, w, scaling.synthetic_data(w), budget=1 << 60, chunk=None)
    out.append({"clients": c, "lower_s": run.lower_s, "compile_s": run.compile_s, "xla_bytes": run.xla_bytes,
                "total_s": time.perf_counter() - t})
    log(f"  C={c:>6}: lower {run.lower_s:.2f} s, compile {run.compile_s:.2f} s, "
        f"XLA buffers {memory.gib(run.xla_bytes)}")
  return out


def summary(results: list[dict[str, Any]]) -> str:
  lines = [f"{'case':<8}{'JAX s/round':>12}{'torch s/round':>14}{'speed-up':>10}{'(CPU s)':>9}{'vs +AST':>9}"
           f"{'JAX GFLOP/s':>12}{'2048^3':>8}{'fraction':>9}{'(CPU s)':>9}{'step mm':>8}{'fraction':>9}{'(CPU s)':>9}"
           "  targets"]
  for r in results:
    by = {row["backend"]: row for row in r["rows"]}
    met = ", ".join(f"{k} >= {v:g}: {'met' if r['met'][k] else 'MISSED'}" for k, v in r["targets"].items())
    lines.append(f"{r['case']:<8}{by['jax']['round_s']:>12.3f}{by['torch']['round_s']:>14.3f}"
                 f"{r['speedup_vs_torch']:>9.1f}x{r['speedup_vs_torch_cpu_time']:>8.1f}x"
                 + (f"{r['speedup_vs_torch_ast']:>8.1f}x" if r.get("speedup_vs_torch_ast") else f"{'-':>9}") +
                 f"{r['jax_gflop_s']:>12.1f}{r['matmul_gflop_s']:>8.0f}{r['fraction_of_matmul']:>9.0%}"
                 f"{r['fraction_of_matmul_cpu_time']:>9.0%}{r['step_matmul_gflop_s']:>8.0f}"
                 f"{r['fraction_of_step_matmul']:>9.0%}{r['fraction_of_step_matmul_cpu_time']:>9.0%}  {met}")
  return "\n".join(lines)


def main(argv=None) -> list[dict[str, Any]]:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--case", default="a,b", help=f"comma-separated, from {list(CASES) + ['compile']}")
  p.add_argument("--rounds", type=positive_int, default=2)
  p.add_argument("--warmup", type=non_negative_int, default=1)
  p.add_argument("--system-allocator", action="store_true", help="see experiments.scaling.ALLOCATOR_ENV")
  p.add_argument("--out", default="benchmarks/results/bench_round")
  args = p.parse_args(argv)
  names = args.case.split(",")
  unknown = sorted(set(names) - set(CASES) - {"compile"})
  if unknown:
    from experiments.cli_errors import UsageError
    raise UsageError(f"unknown --case {', '.join(unknown)}; choose from {', '.join([*CASES, 'compile'])}")
  if not args.system_allocator:
    scaling.reexec_with_allocator_env("benchmarks.bench_round", argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = []
  for name in names:
    if name == "compile":
      rows = compile_scaling()
      (out / "compile.json").write_text(json.dumps(rows, indent=1))
      continue
    res = run_case(name, args.rounds, args.warmup)
    results.append(res)
    (out / f"case_{name}.json").write_text(json.dumps(res, indent=1, default=str))
  if results:
    print(summary(results))
  print(f"threads: {scaling.cpu_threads()} (torch set to the same); results in {out}/")
  return results


def cli(argv=None) -> int:
  """``python -m benchmarks.bench_round``: exit 0, or 2 with one message on a project error."""
  from experiments.cli_errors import guard
  return guard(lambda: main(argv))


if __name__ == "__main__":
  sys.exit(cli())
