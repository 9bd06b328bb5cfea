"""Timing of the runners per client count (interleaved: the machine is shared) and the largest client
count whose compiled round fits a budget (compiles only)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from a2v_jax.federated import memory
from a2v_jax.config import Config
from experiments.scalestudy.runners import (JaxRunner, MatmulRunner, PeakRSS, PopulationRunner,
                                            StepShapesMatmulRunner, TorchRunner)
from experiments.scalestudy.workload import Workload, synthetic_data

def time_point(runners: Sequence[Any], *, rounds: int, warmup: int) -> list[dict[str, Any]]:
  """Sets up and warms each runner (peak RSS measured there), then times their rounds interleaved.

  Why interleaved: the machine is shared, and its load drifts over minutes; alternating rounds
  exposes every backend to the same conditions. Wall time and process CPU time (all threads) are
  both recorded; the latter is less sensitive to other processes.
  """
  state = {}
  for run in runners:
    with PeakRSS() as rss:
      run.setup()
      for r in range(warmup):
        (run.warmup if hasattr(run, "warmup") else run.round)(r)
    state[run.backend] = {"wall": [], "cpu": [], "rss": rss}
  load0 = os.getloadavg()[0]
  for r in range(rounds):
    for run in runners:
      t, c = time.perf_counter(), time.process_time()
      run.round(warmup + r)
      state[run.backend]["wall"].append(time.perf_counter() - t)
      state[run.backend]["cpu"].append(time.process_time() - c)
  load1 = os.getloadavg()[0]
  rows = []
  for run in runners:
    s = state[run.backend]
    round_s, cpu_s = float(np.median(s["wall"])), float(np.median(s["cpu"]))
    rows.append({"backend": run.backend, "clients": run.w.num_clients, "rounds_timed": rounds, "round_s": round_s,
                 "round_s_min": float(np.min(s["wall"])), "cpu_s_per_round": cpu_s,
                 "rounds_per_s": 1.0 / round_s, "samples_per_s": run.samples / round_s,
                 "train_gflop_per_round": run.flops / 1e9, "train_gflop_s": run.flops / round_s / 1e9,
                 "train_gflop_per_cpu_s": run.flops / cpu_s / 1e9,
                 "peak_rss_mb": s["rss"].peak / 2 ** 20, "rss_growth_mb": (s["rss"].peak - s["rss"].start) / 2 ** 20,
                 "loadavg_1min": (load0 + load1) / 2, **run.info()})
  return rows


def study(cfg: Config, clients: Sequence[int], workload: dict[str, Any], *, rounds: int = 3, warmup: int = 1,
          baseline: str = "torch", budget: Optional[int] = None, chunk: Optional[int] = None, seed: int = 0,
          yardstick: bool = False, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs every client count on JAX (and the baselines); returns one row per (backend, C).

  Args:
    cfg: the run config (heads, optimiser, aggregation).
    clients: the client counts C to measure.
    workload: the other ``Workload`` fields (see ``workload_from_args``); its batch size and epochs
      override the config's.
    rounds, warmup: timed rounds after warm-up rounds.
    baseline: "torch", "both" (adds the AST forward per sample and epoch) or "none".
    budget: memory budget in bytes (default: what the device or host has available).
    chunk: client_chunk_size (default: the memory plan's choice).
    yardstick: also time, between the rounds, a plain 2048^3 matmul (``MatmulRunner``) and plain dots
      of one client step's own shapes (``StepShapesMatmulRunner``), so FLOP rates can be compared with
      the machine's under the same load.
  """
  base = dict(workload)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=base["batch_size"],
                                                           local_epochs=base["local_epochs"]))
  rows = []
  for c in clients:
    w = Workload(num_clients=c, **base)
    data = synthetic_data(w, seed)
    log(f"C={c}: {w.samples_per_client} samples x {w.local_epochs} epoch(s) = {w.steps} step(s) of {w.batch_size}, "
        f"{w.tokens} tokens x {w.feature_dim}")
    try:
      copies = {"torch": 4, "both": 8, "none": 0}[baseline]
      jax_run = JaxRunner(cfg, w, data, budget=budget, chunk=chunk, seed=seed, torch_copies=copies)
    except memory.MemoryPlanError as e:
      log(f"  jax: skipped: {e}")
      rows.append({"backend": "jax", "clients": c, "skipped": str(e)})
      continue
    log(f"  jax: {jax_run.plan.describe()}; compiled in {jax_run.compile_s:.1f} s")
    runners = [jax_run] + [TorchRunner(cfg, w, data, lambda: jax_run.params0, with_ast=a, seed=seed)
                           for a in {"torch": [False], "both": [False, True], "none": []}[baseline]]
    runners += [MatmulRunner(w), StepShapesMatmulRunner(w, jax_run.heads)] if yardstick else []
    point = time_point(runners, rounds=rounds, warmup=warmup)
    for row in point[1:]:
      if row["backend"].startswith("matmul"):
        continue
      row["slowdown_vs_jax"] = row["round_s"] / point[0]["round_s"]
      row["cpu_slowdown_vs_jax"] = row["cpu_s_per_round"] / point[0]["cpu_s_per_round"]
    for row in point:
      log(f"  {row['backend']:<9} {row['round_s']:.4f} s/round ({row['cpu_s_per_round']:.4f} CPU s), "
          f"{row['train_gflop_s']:.1f} GFLOP/s"
          + (f", {row['slowdown_vs_jax']:.1f}x the JAX time" if "slowdown_vs_jax" in row else ""))
    rows += point
    del jax_run, runners
  return rows


def population_study(cfg: Config, populations: Sequence[int], cohort: int, workload: dict[str, Any], *,
                     client_state: str = "stateless", rounds: int = 3, warmup: int = 1, seed: int = 0,
                     reference: bool = True, store_dir: Optional[str] = None,
                     log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Rounds of a cohort of ``cohort`` clients drawn from each population size (``PopulationRunner``); with
  ``reference``, first the full-participation round of ``cohort`` clients (``JaxRunner``), the yardstick a
  population round should stay near. One row per point; each point is measured in turn."""
  base = dict(workload)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=base["batch_size"],
                                                           local_epochs=base["local_epochs"]))
  rows = []
  w = Workload(num_clients=cohort, **base)
  if reference:
    run = JaxRunner(cfg, w, synthetic_data(w, seed), seed=seed)
    (row,) = time_point([run], rounds=rounds, warmup=warmup)
    row.update(population=cohort, cohort=cohort, client_state="full program")
    log(f"full participation, C={cohort}: {row['round_s']:.4f} s/round ({row['cpu_s_per_round']:.4f} CPU s), "
        f"peak RSS {row['peak_rss_mb']:.0f} MB")
    rows.append(row)
    del run
  for p in populations:
    data = synthetic_data(Workload(num_clients=p, **base), seed, with_rows=False)
    run = PopulationRunner(cfg, w, p, data, client_state=client_state, seed=seed,
                           store_dir=None if store_dir is None else f"{store_dir}/pop_{p}")
    (row,) = time_point([run], rounds=rounds, warmup=warmup)
    row["clients"] = p
    if reference:
      row["round_s_vs_full"] = row["round_s"] / rows[0]["round_s"]
    log(f"population {p}, cohort {cohort} ({client_state}): {row['round_s']:.4f} s/round "
        f"({row['cpu_s_per_round']:.4f} CPU s), peak RSS {row['peak_rss_mb']:.0f} MB, store "
        f"{row['store_bytes'] / 2 ** 20:.0f} MB, first round(s) {row['first_rounds_s']:.1f} s")
    rows.append(row)
    del run, data
  return rows


def largest_clients(cfg: Config, budget: int, *, probes: tuple[int, int] = (2, 8), chunk: Optional[int] = None,
                    log: Callable[[str], None] = print, **workload) -> int:
  """The largest client count whose compiled round fits ``budget`` bytes (compiles only, allocates nothing).

  ``chunk``: train that many clients at a time (``client_chunk_size``); None: all at once."""
  if chunk is not None:
    probes = (max(probes[0], chunk + 1), max(probes[1], 4 * chunk))  # chunked programs on both probes
  def bytes_at(c: int) -> Optional[int]:
    w = Workload(num_clients=c, **workload)
    need = JaxRunner(cfg, w, synthetic_data(w), budget=1 << 60, chunk=chunk).xla_bytes
    log(f"  C={c}: XLA assigns {memory.gib(need or 0)}")
    return need
  return memory.largest_count(bytes_at, budget, probes)
