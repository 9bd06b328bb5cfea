"""Where a round's time goes: one client step vmapped over C clients, cut into stages (not a test).

  python -m benchmarks.profile_round [--case b|a] [--clients 100] [--reps 5]

Times, on the same batch and params, vmapped over C clients (CPU seconds of this process and wall
seconds, medians): the step's matmuls alone (same shapes, no elementwise work), the forward pass,
forward + backward, the whole step (+ AdamW, the has-data guard), and the engine's full round divided
by its steps. The gaps between stages say which part is not matmul; XLA's count of bytes accessed per
step says how much memory traffic the elementwise work adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable

from benchmarks import bench_round
from experiments import scaling

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from a2v_jax import config as config_lib  # noqa: E402
from a2v_jax.federated import optim  # noqa: E402
from a2v_jax.federated.local import branch_losses  # noqa: E402
from a2v_jax.models.heads import make_heads  # noqa: E402
from experiments.cli_errors import positive_int  # noqa: E402


def timed(fn: Callable, *args, reps: int) -> dict[str, float]:
  """Median wall and process-CPU seconds of ``fn(*args)`` after one warm-up call."""
  jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(reps):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return {"wall_s": float(np.median(wall)), "cpu_s": float(np.median(cpu))}


def profile(case: str, clients: int, reps: int) -> list[dict[str, Any]]:
  spec = bench_round.CASES[case]
  cfg = config_lib.load("experiments/configs/fsdd_tiny.json", spec.get("overrides", []))
  wl = bench_round._workload(cfg, spec)
  b, t, d = wl["batch_size"], wl["tokens"], wl["feature_dim"]
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=b, local_epochs=1))
  heads = make_heads(cfg, wl["target_shapes"])
  key = jax.random.PRNGKey(0)
  params = heads.init(key, jnp.zeros((1, t, d)))["params"]
  stack = lambda tree: jax.tree.map(lambda v: jnp.broadcast_to(v, (clients,) + v.shape) + 0, tree)
  cp = stack(params)
  x = jax.random.normal(key, (clients, b, t, d))
  y = {k: jax.random.normal(key, (clients, b) + tuple(s)) for k, s in wl["target_shapes"].items()}
  mask = jnp.ones((clients, b))
  tx = optim.client_optimizer(cfg)
  opt = jax.vmap(tx.init)(cp)

  def loss(p, xb, yb, mb):
    return sum(branch_losses(heads.apply({"params": p}, xb), yb, mb, 0.0).values())

  def step(p, o, xb, yb, mb):
    g = jax.grad(loss)(p, xb, yb, mb)
    u, o2 = tx.update(g, o, p)
    return optax.apply_updates(p, u), o2

  # The step's matmuls alone, same shapes: per Dense (in -> out) over its rows (B*T tokens for the
  # adapter, projection and kv; B*K latents for the rest), forward plus the two backward products.
  dense = [(b * m, i, o) for m, i, o in scaling.dense_shapes(heads, t, d)]

  def matmuls(ws, xs, gs):
    acc = 0.0
    for (m, i, o), w, xx, g in zip(dense, ws, xs, gs):
      out = jnp.einsum("cmi,cio->cmo", xx, w)
      gi = jnp.einsum("cmo,cio->cmi", g, w)
      gw = jnp.einsum("cmi,cmo->cio", xx, g)
      acc = acc + out[:, 0, 0] + gi[:, 0, 0] + gw[:, 0, 0]
    return acc

  mm_args = ([jax.random.normal(key, (clients, i, o)) for m, i, o in dense],
             [jax.random.normal(key, (clients, m, i)) for m, i, o in dense],
             [jax.random.normal(key, (clients, m, o)) for m, i, o in dense])
  mm_flops = sum(3 * 2 * clients * m * i * o for m, i, o in dense)

  flops = 3 * scaling.forward_flops_per_sample(heads, t, d) * b * clients
  n = 2048
  sq = jax.random.normal(key, (n, n))
  stages = {
      "yardstick 2048^3": (jax.jit(jnp.dot), (sq, sq), 2 * n ** 3),
      "matmuls only": (jax.jit(matmuls), mm_args, mm_flops),
      "forward": (jax.jit(jax.vmap(lambda p, xb: heads.apply({"params": p}, xb))), (cp, x), flops / 3),
      "forward+backward": (jax.jit(jax.vmap(jax.grad(loss))), (cp, x, y, mask), flops),
      "step (+AdamW)": (jax.jit(jax.vmap(step)), (cp, opt, x, y, mask), flops),
  }
  rows = []
  print(f"case {case}, {clients} clients x batch {b} x {t} tokens x {d}; analytic train GFLOP per step "
        f"{flops / 1e9:.2f} (the Dense matmuls: {mm_flops / 1e9:.2f})")
  for name, (fn, args, fl) in stages.items():
    r = timed(fn, *args, reps=reps)
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    r.update(stage=name, gflop=fl / 1e9, gflop_per_cpu_s=fl / r["cpu_s"] / 1e9,
             xla_gb_accessed=cost.get("bytes accessed", 0) / 1e9)
    rows.append(r)
    print(f"{name:<18} {r['wall_s'] * 1e3:8.1f} ms wall {r['cpu_s'] * 1e3:8.1f} ms CPU "
          f"{r['gflop_per_cpu_s']:6.1f} GFLOP per CPU s ({r['gflop_per_cpu_s'] / rows[0]['gflop_per_cpu_s']:4.0%} "
          f"of the yardstick); XLA: {r['xla_gb_accessed']:.2f} GB accessed")
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--case", default="b")
  p.add_argument("--clients", type=positive_int, default=100)
  p.add_argument("--reps", type=positive_int, default=5)
  args = p.parse_args(argv)
  if args.case not in bench_round.CASES:
    from experiments.cli_errors import UsageError
    raise UsageError(f"unknown --case {args.case}; choose from {', '.join(bench_round.CASES)}")
  print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
  rows = profile(args.case, args.clients, args.reps)
  print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
  return rows


def cli(argv=None) -> int:
  """``python -m benchmarks.profile_round``: exit 0, or 2 with one message on a project error."""
  from experiments.cli_errors import guard
  return guard(lambda: main(argv))


if __name__ == "__main__":
  sys.exit(cli())
