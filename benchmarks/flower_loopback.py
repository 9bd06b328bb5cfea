"""A real Flower deployment on this machine: a SuperLink and N SuperNodes on 127.0.0.1, ``flwr run`` of the
a2v-jax Flower App; optionally one SuperNode killed after round 1. Needs the ``[flower]`` extra.

  python -m benchmarks.flower_loopback --nodes 2 --rounds 2 --out checkpoints/flower_loopback
  python -m benchmarks.flower_loopback --nodes 2 --rounds 3 --kill-node 1 --set deployment_on_node_failure=\\"continue\\"
  python -m benchmarks.flower_loopback --nodes 2 --rounds 3 --secure   # SecAgg+ rounds

Writes ``{out}/result.json`` (rows, rounds/s, what happened to the killed node) and the run directory
``{out}/runs/loopback``; the processes' logs are ``{out}/*.log``. Every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from a2v_jax.run import children
from experiments.cli_errors import non_negative_int, positive_float, positive_int

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "a2v_jax" / "deploy" / "flower_project"
# The default run: 2 FSDD digits on N speaker-nodes, narrow heads (what tests/test_distributed.py runs).
SETTINGS = ['selected_classes=["zero","one"]', "clip_adapter_hidden=[16]", "t5_adapter_hidden=[16]"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _bin(name: str) -> str:
  return str(Path(sys.executable).parent / name)


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen) -> float:
  """Seconds until ``host:port`` accepts a connection (the SuperLink is listening), bounded by ``timeout_s``.

  Raises:
    RuntimeError: the process exited first, or the port did not open in time (its log names why).
  """
  t0 = time.time()
  while time.time() - t0 < timeout_s:
    if proc.poll() is not None:
      raise RuntimeError(f"the process listening on {host}:{port} exited with status {proc.returncode} before it "
                         "listened (see its log)")
    try:
      with socket.create_connection((host, port), timeout=1.0):
        return time.time() - t0
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s (see the SuperLink's log)")


def _wait_rows(path: Path, n: int, timeout_s: float, procs: list) -> None:
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if path.is_file() and len(path.read_text().splitlines()) >= n:
      return
    if procs[-1].poll() is not None:
      return
    time.sleep(0.5)
  raise TimeoutError(f"no round {n} in {path} within {timeout_s:.0f} s")


def run(nodes: int, rounds: int, out: Path, *, kill_node: int | None = None, extra: list[str] = (),
        reply_timeout_s: float = 120.0, timeout_s: float = 900.0, secure: bool = False,
        rejoin_wait_s: float = 0.0) -> dict:
  out = Path(out).resolve()
  if out.exists():
    shutil.rmtree(out)
  out.mkdir(parents=True)
  home = out / "flwr_home"
  home.mkdir()
  port = _free_port()
  (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                    f'address = "127.0.0.1:{port}"\ninsecure = true\n')
  env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
             PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"))
  logs = []

  def start(name: str, args: list[str]) -> subprocess.Popen:
    f = open(out / f"{name}.log", "w")
    logs.append(f)
    return children.popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

  procs = [start("superlink", [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                               "--database", str(out / "link.db"), "--disable-runtime-dependency-installation"])]
  wait_for_port("127.0.0.1", port, 120.0, procs[0])  # a loaded machine took 6.2 s; a fixed 3 s sleep failed there
  for i in range(nodes):
    procs.append(start(f"supernode{i}", [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                          "--node-config", f"partition-id={i}", "--port", str(_free_port())]))
  sets = SETTINGS + [f"num_nodes={nodes}", f"global_rounds={rounds}", f'output_dir="{out / "runs"}"',
                     'name="loopback"', f'cache_dir="{out / "cache"}"', f'tiny_dir="{out / "tiny"}"', *extra]
  run_config = (f"config='{ROOT / 'experiments/configs/fsdd_tiny.json'}' set='{';'.join(sets)}' "
                f"reply-timeout-s={reply_timeout_s} rejoin-wait-s={rejoin_wait_s}"
                + (" secure-aggregation=true" if secure else ""))
  t0 = time.time()
  procs.append(start("flwr_run", [_bin("flwr"), "run", str(APP), "loopback", "--run-config", run_config, "--stream"]))
  killed = None
  try:
    metrics = out / "runs" / "loopback" / "metrics.jsonl"
    if kill_node is not None:
      _wait_rows(metrics, 1, timeout_s, procs)
      os.killpg(procs[1 + kill_node].pid, signal.SIGKILL)  # the SuperNode and its ClientApp processes
      killed = {"node": kill_node, "after_round": 1}
    procs[-1].wait(timeout=timeout_s)
  finally:
    wall = time.time() - t0
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    for f in logs:
      f.close()
  rows = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.is_file() else []
  summary = out / "runs" / "loopback" / "summary.json"
  result = {"nodes": nodes, "rounds": rounds, "secure_aggregation": secure, "rows": len(rows), "finished": summary.is_file(), "wall_s": round(wall, 1),
            "mean_round_seconds": (round(sum(r["round_seconds"] for r in rows) / len(rows), 2) if rows else None),
            "killed": killed, "nodes_missing": [r.get("server/nodes_missing", 0) for r in rows]}
  (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nodes", type=positive_int, default=2)
  p.add_argument("--rounds", type=positive_int, default=2)
  p.add_argument("--out", default="checkpoints/flower_loopback")
  p.add_argument("--kill-node", type=non_negative_int, default=None, help="SIGKILL this SuperNode after round 1")
  p.add_argument("--reply-timeout-s", type=positive_float, default=120.0)
  p.add_argument("--set", action="append", default=[], help="key=value override of the experiment config")
  p.add_argument("--secure", action="store_true", help="secure aggregation (SecAgg+: run config secure-aggregation)")
  args = p.parse_args(argv)
  result = run(args.nodes, args.rounds, Path(args.out), kill_node=args.kill_node, extra=args.set,
               reply_timeout_s=args.reply_timeout_s, secure=args.secure)
  print(json.dumps(result, indent=2))
  return 0 if result["finished"] else 1


if __name__ == "__main__":
  sys.exit(main())
