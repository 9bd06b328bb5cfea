"""SIGKILL a run at random moments (during rounds and during checkpoint saves), --resume it each time, and
compare the finished run with a straight one, bit for bit (not a test: a few minutes of CPU).

  python -m benchmarks.kill_resume [--kills 5] [--rounds 40] [--seed 0] [--out benchmarks/results/kill_resume]

One run directory is killed ``--kills`` times: odd kills wait for orbax's temporary folder of a round being
saved (``state/N.orbax-checkpoint-tmp*``) and kill the moment it appears; even kills happen at a random time
after the run's first round row. After each kill the same command with ``--resume`` continues; the last one
runs to the end. Every ``train/`` and ``test/`` number of every round row, and the summary's final metrics,
must equal the straight run's exactly. Writes ``kill_resume.json`` (each kill: when, where, the round kept)
and prints one line per kill and the verdict; exit 0 when identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from a2v_jax.run import children
from experiments.cli_errors import non_negative_int, positive_int

CONFIG = "experiments/configs/fsdd_tiny.json"


def _cmd(out: Path, name: str, rounds: int, seed: int, resume: bool) -> list[str]:
  sets = [f'output_dir="{out}"', f'name="{name}"', f"global_rounds={rounds}", f"seed={seed}",
          "checkpoint_frequency=5", "eval_gap=5"]
  return ([sys.executable, "-m", "experiments.run", "--config", CONFIG, "--quiet"]
          + [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else []))


def _rows(run: Path) -> list[dict]:
  path = run / "metrics.jsonl"
  if not path.is_file():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _numbers(rows: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k == "round" or k.startswith(("train/", "test/"))} for r in rows]


def _saves_in_progress(run: Path) -> set[str]:
  """orbax's temporary folders of rounds being saved (one left by a killed save stays until cleaned)."""
  state = run / "state"
  return {p.name for p in state.iterdir() if ".orbax-checkpoint-tmp" in p.name} if state.is_dir() else set()


def kill_once(cmd: list[str], run: Path, during_save: bool, rng: random.Random, timeout_s: float = 600) -> dict:
  """Starts ``cmd``, kills it (SIGKILL) as asked; returns what happened (or that it finished first)."""
  t0 = time.time()
  stale = _saves_in_progress(run)  # left by an earlier kill: not a save of this process
  p = children.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  rows0 = len(_rows(run))
  delay = rng.uniform(0.5, 6.0)
  first_row_at = None
  while p.poll() is None and time.time() - t0 < timeout_s:
    if during_save:
      if _saves_in_progress(run) - stale:
        break
      time.sleep(0.005)
      continue
    if first_row_at is None and len(_rows(run)) > rows0:
      first_row_at = time.time()
    if first_row_at is not None and time.time() - first_row_at >= delay:
      break
    time.sleep(0.02)
  if p.poll() is not None:
    return {"killed": False, "returncode": p.returncode, "stderr": p.stderr.read()[-2000:]}
  saving = bool(_saves_in_progress(run) - stale)
  os.kill(p.pid, signal.SIGKILL)
  p.wait()
  kept = sorted(int(x.name) for x in (run / "state").iterdir() if x.name.isdigit()) if (run / "state").is_dir() else []
  return {"killed": True, "during_save": saving, "after_s": round(time.time() - t0, 2),
          "rows_logged": len(_rows(run)), "rounds_kept": kept}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kills", type=non_negative_int, default=5)
  p.add_argument("--rounds", type=positive_int, default=40)
  p.add_argument("--seed", type=non_negative_int, default=0, help="the run's seed and the kill moments' seed")
  p.add_argument("--out", default="benchmarks/results/kill_resume")
  args = p.parse_args(argv)
  out = Path(args.out)
  work = out / "runs"
  if work.exists():
    import shutil
    shutil.rmtree(work)
  work.mkdir(parents=True)
  rng = random.Random(args.seed)
  t0 = time.time()
  straight = children.run(_cmd(work, "straight", args.rounds, args.seed, False), capture_output=True, text=True)
  if straight.returncode != 0:
    print(straight.stderr[-3000:], file=sys.stderr)
    return 1
  straight_s = time.time() - t0
  run = work / "killed"
  kills = []
  for i in range(args.kills):
    during_save = i % 2 == 0
    k = kill_once(_cmd(work, "killed", args.rounds, args.seed, resume=i > 0), run, during_save, rng)
    k.update(kill=i + 1, aimed_at="a save" if during_save else "a round")
    kills.append(k)
    print(json.dumps(k))
    if not k["killed"]:
      break
  final = children.run(_cmd(work, "killed", args.rounds, args.seed, True), capture_output=True, text=True)
  a, b = _numbers(_rows(work / "straight")), _numbers(_rows(run))
  sa = json.loads((work / "straight" / "summary.json").read_text())["final"]
  sb = json.loads((run / "summary.json").read_text())["final"] if (run / "summary.json").is_file() else None
  identical = final.returncode == 0 and a == b and sa == sb
  result = {"config": CONFIG, "rounds": args.rounds, "seed": args.seed, "kills": kills,
            "straight_seconds": round(straight_s, 1), "rows": len(b), "identical": identical,
            "final_returncode": final.returncode, "final_stderr": final.stderr[-2000:] if final.returncode else ""}
  (out / "kill_resume.json").write_text(json.dumps(result, indent=1))
  print(f"{sum(k['killed'] for k in kills)} kill(s) "
        f"({sum(bool(k.get('during_save')) for k in kills)} during a save), then --resume to round {args.rounds}: "
        f"{len(b)} rows; {'IDENTICAL to' if identical else 'DIFFERENT from'} the straight run "
        f"(every train/ and test/ number, and the final metrics); written {out}/kill_resume.json")
  return 0 if identical else 1


if __name__ == "__main__":
  sys.exit(main())
