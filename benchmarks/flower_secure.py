"""README's two-machine Flower commands, run as written on 127.0.0.1: TLS with the project's certificate script, a
SuperLink with ``--database`` and ``--enable-supernode-auth``, nodes registered by key, each node with only its own
clips (node I holds FSDD's speaker I). Optionally the same run again with the SuperLink SIGKILLed after one round,
restarted and the run resumed (README's ``resume=true`` line), and a SuperNode SIGKILLed and restarted after
another; its rows must equal the first run's.

  python -m benchmarks.flower_secure --out checkpoints/flower_secure
  python -m benchmarks.flower_secure --out checkpoints/flower_secure --restarts   # + the run with restarts

The commands are read from README (between the ``flower-commands`` markers) and each is given to ``bash -c``
unchanged, with ``SERVER=127.0.0.1``, ``I`` and ``DATA`` set; they run in ``{out}/<run>/site`` (the checkout's
``a2v_jax`` and ``experiments`` linked there, so the certificates, database, caches and run directory land under
``out``). Writes ``{out}/result.json`` (per run: wall time, s/round, rows, what was killed and when; the largest
difference between the two runs' rows) and every process's log, ``{out}/<run>/*.log``. Needs ``openssl``,
``ssh-keygen`` and the SuperLink's port (9093, as README gives it) free.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from a2v_jax.run import children
from benchmarks.flower_loopback import wait_for_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- flower-commands:begin", "<!-- flower-commands:end -->"
# (what a command line starts with, its role); every role appears once, in this order
ROLES = (("a2v_jax/deploy/make_certs.sh", "certs"), ("flower-superlink", "superlink"),
         ("python -m a2v_jax.deploy.connection", "connection"), ("flwr supernode register", "register"),
         ("flower-supernode", "supernode"), ("flwr run", "run"), ("flwr run", "resume"))
FSDD = ROOT / "data" / "fsdd" / "recordings"
STALL_S = 300.0


@dataclass(frozen=True)
class Command:
  role: str
  line: str  # one shell command, continuation lines joined


def readme_commands(text: str) -> list[Command]:
  """README's deployment commands in order.

  Raises:
    ValueError: the markers or the bash block are missing, a line is none of the known commands, a role is missing
      or out of order.
  """
  try:
    block = text[text.index(BEGIN):text.index(END)]
    block = block[block.index("```bash\n") + 8:block.rindex("```")]
  except ValueError:
    raise ValueError(f"README has no bash block between '{BEGIN} ...' and '{END}'") from None
  commands = []
  for line in re.sub(r"\\\n\s*", "", block).splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    role = next((r for prefix, r in ROLES if line.startswith(prefix)), None)
    if role == "run" and "resume=true" in line:
      role = "resume"
    if role is None:
      raise ValueError(f"README's deployment block: {line!r} is none of {[p for p, _ in ROLES]}")
    commands.append(Command(role, line))
  if [c.role for c in commands] != [r for _, r in ROLES]:
    raise ValueError(f"README's deployment block has {[c.role for c in commands]}, want {[r for _, r in ROLES]}")
  return commands


def _int_after(pattern: str, line: str, what: str) -> int:
  m = re.search(pattern, line)
  if m is None:
    raise ValueError(f"{what}: no match for {pattern!r} in {line!r}")
  return int(m.group(1))


def _node_folders(out: Path, num_nodes: int) -> list[Path]:
  """Node I's own folder: FSDD's clips of (sorted) speaker I, linked."""
  speakers = sorted({p.name.split("_")[1] for p in FSDD.iterdir()})
  if num_nodes > len(speakers):
    raise ValueError(f"FSDD has {len(speakers)} speakers, the commands ask for {num_nodes} nodes")
  folders = []
  for i in range(num_nodes):
    rec = out / "data" / f"node{i}" / "recordings"
    rec.mkdir(parents=True)
    for p in FSDD.iterdir():
      if p.name.split("_")[1] == speakers[i]:
        (rec / p.name).symlink_to(p)
    folders.append(rec.parent)
  return folders


class Site:
  """One run of the commands: processes, their logs, the environment."""

  def __init__(self, out: Path, num_nodes: int):
    self.out = out
    self.site = out / "site"
    self.site.mkdir(parents=True)
    for name in ("a2v_jax", "experiments"):
      (self.site / name).symlink_to(ROOT / name)
    self.data = _node_folders(out, num_nodes)
    self.env = dict(os.environ, SERVER="127.0.0.1", FLWR_HOME=str(out / "flwr_home"), JAX_PLATFORMS="cpu",
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    self.procs: dict[str, subprocess.Popen] = {}
    self.logs: list = []
    self.events: list[dict] = []
    self.t0 = time.time()

  def _env(self, node: Optional[int]) -> dict:
    return self.env if node is None else dict(self.env, I=str(node), DATA=str(self.data[node]))

  def once(self, cmd: Command, node: Optional[int] = None, timeout_s: float = 300.0) -> None:
    name = cmd.role if node is None else f"{cmd.role}{node}"
    r = children.run(["bash", "-c", cmd.line], cwd=self.site, env=self._env(node), capture_output=True, text=True,
                     timeout=timeout_s)
    (self.out / f"{name}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
      raise RuntimeError(f"README's command failed ({r.returncode}): {cmd.line}\n{(r.stdout + r.stderr)[-2000:]}")

  def start(self, cmd: Command, node: Optional[int] = None, tag: str = "") -> subprocess.Popen:
    name = (cmd.role if node is None else f"{cmd.role}{node}")
    f = open(self.out / f"{name}{tag}.log", "w")
    self.logs.append(f)
    p = children.popen(["bash", "-c", cmd.line], cwd=self.site, env=self._env(node), stdout=f,
                       stderr=subprocess.STDOUT, start_new_session=True)
    self.procs[name] = p
    return p

  def note(self, what: str, **kw) -> None:
    self.events.append({"t_s": round(time.time() - self.t0, 1), "event": what, **kw})

  def metrics(self) -> Optional[Path]:
    found = sorted(self.site.glob("checkpoints/runs/*/metrics.jsonl"))
    return found[0] if found else None

  def rows(self) -> list[dict]:
    m = self.metrics()
    return [json.loads(l) for l in m.read_text().splitlines()] if m else []

  def stop(self) -> None:
    for p in self.procs.values():
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    for f in self.logs:
      f.close()


def run_commands(out: Path, *, kill_superlink_after: Optional[int] = None,
                 restart_node: Optional[tuple[int, int]] = None, timeout_s: float = 1800.0) -> dict:
  """Runs README's commands; ``kill_superlink_after=R``: once round R is logged, SIGKILL the SuperLink process and
  start it again with the same command; ``restart_node=(I, R)``: once round R is logged, SIGKILL SuperNode I (and
  its ClientApp processes) and start it again."""
  commands = {c.role: c for c in readme_commands(README.read_text())}
  num_nodes = _int_after(r"num_nodes=(\d+)", commands["run"].line, "flwr run")
  rounds = _int_after(r"global_rounds=(\d+)", commands["run"].line, "flwr run")
  port = _int_after(r"--port (\d+)", commands["superlink"].line, "flower-superlink")
  if out.exists():
    shutil.rmtree(out)
  site = Site(out, num_nodes)
  pending = {}
  if kill_superlink_after is not None:
    pending["superlink"] = kill_superlink_after
  if restart_node is not None:
    pending["node"] = restart_node[1]
  try:
    site.once(commands["certs"])
    link = site.start(commands["superlink"])
    site.note("superlink listening", after_s=round(wait_for_port("127.0.0.1", port, 120.0, link), 1))
    site.once(commands["connection"])
    for i in range(num_nodes):
      site.once(commands["register"], i)
    for i in range(num_nodes):
      site.start(commands["supernode"], i)
    t_run = time.time()
    flwr_run = site.start(commands["run"])
    last_row, rows_seen, stream_ended, rejoin = time.time(), 0, False, None
    # The run ends when its summary is written. (`flwr run --stream` exits when the SuperLink it streams from goes
    # away, while the ServerApp goes on: then it is waited for by its rows, up to STALL_S without a new one.)
    while not (site.metrics() and (site.metrics().parent / "summary.json").is_file()):
      if time.time() - t_run > timeout_s:
        raise TimeoutError(f"the run did not finish within {timeout_s:.0f} s (logs in {out})")
      if flwr_run.poll() is not None and not stream_ended:
        stream_ended = True
        site.note("flwr run returned", exit=flwr_run.returncode, after_round=len(site.rows()))
      done = len(site.rows())
      if done > rows_seen:
        rows_seen, last_row = done, time.time()
      if (stream_ended and flwr_run.returncode == 0) or (stream_ended and time.time() - last_row > STALL_S):
        break
      if "superlink" in pending and done >= pending["superlink"]:
        # SIGKILL the SuperLink process; the SuperExec it started (--parent-pid) and the ServerApp go with it
        os.kill(site.procs["superlink"].pid, signal.SIGKILL)
        site.procs["superlink"].wait()
        site.note("superlink SIGKILLed", after_round=done)
        link = site.start(commands["superlink"], tag="_restarted")
        site.note("superlink restarted", listening_after_s=round(wait_for_port("127.0.0.1", port, 120.0, link), 1))
        flwr_run, stream_ended = site.start(commands["resume"]), False
        site.note("flwr run ... resume=true")
        del pending["superlink"]
      if "node" in pending and done >= pending["node"]:
        i = restart_node[0]
        os.killpg(site.procs[f"supernode{i}"].pid, signal.SIGKILL)  # the SuperNode and its ClientApp processes
        site.procs[f"supernode{i}"].wait()
        site.note(f"supernode {i} SIGKILLed", after_round=done)
        del pending["node"]
        rejoin = {"tries": 0, "next": time.time()}
      # A restarted SuperNode is refused (exit 305) until the SuperLink has counted it offline (2 missed
      # heartbeats, ~60 s): started again, as a service manager would, until it stays up.
      if rejoin is not None and time.time() >= rejoin["next"]:
        proc = site.procs[f"supernode{restart_node[0]}"]
        if rejoin["tries"] and proc.poll() is None:
          site.note(f"supernode {restart_node[0]} up again", tries=rejoin["tries"])
          rejoin = None
        else:
          if rejoin["tries"]:
            site.note(f"supernode {restart_node[0]} restart refused", exit=proc.returncode)
          rejoin["tries"] += 1
          site.start(commands["supernode"], restart_node[0], tag=f"_restarted{rejoin['tries']}")
          rejoin["next"] = time.time() + 20
      time.sleep(0.5)
    wall = time.time() - t_run
    try:
      flwr_run.wait(timeout=60)  # (its stream ends with the run)
    except subprocess.TimeoutExpired:
      pass
  finally:
    site.stop()
  rows = site.rows()
  summary = site.metrics().parent / "summary.json" if site.metrics() else None
  times = [r["round_seconds"] for r in rows]
  return {"finished": bool(summary and summary.is_file()), "rounds": rounds, "rows": len(rows),
          "flwr_run_exit": flwr_run.returncode, "wall_s": round(wall, 1),
          "first_round_s": round(times[0], 1) if times else None,
          "mean_round_s_after_first": round(sum(times[1:]) / len(times[1:]), 2) if len(times) > 1 else None,
          "events": site.events, "metrics": str(site.metrics()) if site.metrics() else None}


def largest_difference(a: list[dict], b: list[dict]) -> float:
  """The largest |difference| over the train/test numbers of two runs' rows (inf if their rounds or keys differ)."""
  if [r["round"] for r in a] != [r["round"] for r in b]:
    return float("inf")
  worst = 0.0
  for x, y in zip(a, b):
    keys = {k for k in x if k.startswith(("train/", "test/"))}
    if keys != {k for k in y if k.startswith(("train/", "test/"))}:
      return float("inf")
    worst = max([worst] + [abs(x[k] - y[k]) for k in keys])
  return worst


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="checkpoints/flower_secure")
  p.add_argument("--restarts", action="store_true", help="then the same run with a SuperLink SIGKILLed and "
                 "restarted after round 1 and SuperNode 1 after round 3; its rows are compared with the first run's")
  p.add_argument("--timeout-s", type=float, default=1800.0)
  args = p.parse_args(argv)
  out = Path(args.out).resolve()
  result = {"plain": run_commands(out / "plain", timeout_s=args.timeout_s)}
  print(json.dumps(result, indent=2), flush=True)
  if args.restarts:
    result["restarted"] = run_commands(out / "restarted", kill_superlink_after=1, restart_node=(1, 3),
                                       timeout_s=args.timeout_s)
    rows = [[json.loads(l) for l in Path(result[k]["metrics"]).read_text().splitlines()]
            if result[k]["metrics"] else [] for k in ("plain", "restarted")]
    result["largest_difference"] = largest_difference(*rows)
  (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))
  ok = all(r["finished"] for k, r in result.items() if isinstance(r, dict))
  return 0 if ok and result.get("largest_difference", 0.0) < 1e-4 else 1


if __name__ == "__main__":
  sys.exit(main())
