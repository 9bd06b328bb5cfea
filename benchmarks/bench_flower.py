"""What deployment costs: rounds/s of the vmapped engine against the same rounds through Flower's messages.

Three paths on the same synthetic workload (Gaussian class clusters of AST-like tokens, the tests' narrow
heads), evaluation off, seconds per round after the first (compiling) round:
  engine     the vmapped simulation (run/trainer.py)
  local      the deployment programs without messages (deploy/run.py LocalTransport): per-node programs
  flower     the Flower ClientApp / ServerApp exchanging Flower messages in one process (InProcessGrid)
A real network deployment adds, per round, the transport and (with flwr 1.42's SuperNode) a ClientApp
process per message: ``benchmarks/flower_loopback.py`` measures that end to end.

  python -m benchmarks.bench_flower --nodes 5 50 --rounds 4 --out benchmarks/flower_results.json

Needs the ``[flower]`` extra for the flower path (the others run without it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from a2v_jax.data.nodes import NodeData
from a2v_jax.data.records import Clip, ClipSet
from a2v_jax.run.trainer import Prepared, train_and_evaluate
from experiments.cli_errors import positive_int

CONFIG = "experiments/configs/fsdd_tiny.json"
SETTINGS = ["local_epochs=1", "batch_size=8", "clip_adapter_hidden=[16]", "t5_adapter_hidden=[16]", "map_heads=2",
            "eval_gap=0", "checkpoint_frequency=1000"]


def workload(num_nodes: int, per_node: int = 24, classes: int = 4, tokens: int = 6, dim: int = 16,
             seed: int = 0) -> Prepared:
  """``num_nodes`` nodes of ``per_node`` clips each (3/5 train), per-class Gaussian token clusters."""
  rs = np.random.RandomState(seed)
  centers = rs.randn(classes, dim).astype(np.float32)
  clips, feats, nodes = [], [], []
  for n in range(num_nodes):
    start = len(clips)
    for i in range(per_node):
      label = int(rs.randint(classes))
      clips.append(Clip(path=f"<synthetic>/{n}_{i}", label=label, group=f"g{n}", clip_id=f"{n}_{i}", split="train"))
      feats.append(centers[label] + 0.7 * rs.randn(tokens, dim))
    own = np.arange(start, len(clips))
    nodes.append({"train": own[(own - start) % 5 >= 2], "val": own[(own - start) % 5 == 1],
                  "test": own[(own - start) % 5 == 0]})
  targets = {"clip": rs.randn(classes, 8).astype(np.float32), "t5": rs.randn(classes, 3, 8).astype(np.float32)}
  cs = ClipSet("synthetic", tuple(f"c{i}" for i in range(classes)), tuple(clips))
  return Prepared(NodeData(cs, tuple(nodes)), np.asarray(feats, np.float32), targets)


def measure(num_nodes: int, rounds: int, paths: list[str]) -> dict:
  from a2v_jax.reference.config import load_config
  prep = workload(num_nodes)
  out: dict = {"nodes": num_nodes, "rounds": rounds}
  with tempfile.TemporaryDirectory() as tmp:
    sets = SETTINGS + [f"num_nodes={num_nodes}", f"global_rounds={rounds}", f'output_dir="{tmp}"']
    for path in paths:
      cfg = load_config(CONFIG, sets + [f'name="{path}"'])
      t0 = time.time()
      if path == "engine":
        s = train_and_evaluate(cfg, verbose=False, prepared=prep)
      elif path == "local":
        from a2v_jax.deploy.node import NodeProgram
        from a2v_jax.deploy.run import LocalTransport, run_deployment
        s = run_deployment(cfg, LocalTransport([NodeProgram.build(cfg, i, prep) for i in range(num_nodes)]),
                           verbose=False)
      else:
        from a2v_jax.deploy import flower_app
        flower_app.run_in_process({"config": CONFIG, "set": ";".join(sets + [f'name="{path}"'])}, num_nodes,
                                  client=flower_app.make_client_app(lambda c: prep),
                                  server=flower_app.make_server_app(verbose=False))
        s = json.loads((Path(tmp) / path / "summary.json").read_text())
      sec = s["mean_round_seconds_after_first"]
      out[path] = {"seconds_per_round": round(sec, 4), "rounds_per_second": round(1 / sec, 3),
                   "wall_s": round(time.time() - t0, 1)}
      print(f"{num_nodes} nodes, {path}: {sec:.3f} s/round ({1 / sec:.2f} rounds/s)", flush=True)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nodes", type=positive_int, nargs="+", default=[5, 50])
  p.add_argument("--rounds", type=positive_int, default=4)
  p.add_argument("--paths", nargs="+", default=["engine", "local", "flower"], choices=["engine", "local", "flower"])
  p.add_argument("--out", default="benchmarks/flower_results.json")
  args = p.parse_args(argv)
  results = [measure(n, args.rounds, args.paths) for n in args.nodes]
  Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  from experiments.cli_errors import guard
  sys.exit(guard(main))
