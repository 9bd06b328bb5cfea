"""SIGTERM / SIGINT stop a run after the round in flight, checkpointed, with one line and a stated status
(143 / 130), every process of a two-process job at the same round; ``--resume`` then equals a straight run.
Children of our scripts die with them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from a2v_jax.run import children

from a2v_jax.run.stop import StopRequests, Stopped
from tests.test_distributed import (ROOT, _assert_rows_close, _cli_args, _cli_env, _free_port, _outputs, _rows)

pytestmark = pytest.mark.skipif(not (ROOT / "data" / "fsdd" / "recordings").is_dir(), reason="FSDD not present")


def test_a_signal_becomes_a_request_and_the_second_acts_at_once():
  with StopRequests() as stop:
    assert not stop.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert stop.should_stop(2) and stop.received == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
  assert Stopped("SIGTERM", 3).exit_status == 143 and Stopped("SIGINT", 3).exit_status == 130


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from a2v_jax import config
  from a2v_jax.backbones.paths import backbone_dir
  tmp = tmp_path_factory.mktemp("signals")
  cfg = config.load(None, [f'tiny_dir="{tmp / "backbones"}"'])
  for kind in ("ast", "clip_text", "t5"):
    backbone_dir(cfg, kind)
  return tmp


ROUNDS = 4
JOB_ROUNDS = 12  # the job's processes agree on a round a few rounds after the signal (JAX's sync protocol)
NO_REGULAR_SAVE = ["--set", "checkpoint_frequency=100"]  # the only checkpoints: the signal's and the last


def _wait_for_rows(run: Path, n: int, procs, timeout_s: float = 300) -> None:
  deadline = time.time() + timeout_s
  path = run / "metrics.jsonl"
  while time.time() < deadline:
    if path.is_file() and len(path.read_text().splitlines()) >= n:
      return
    if any(p.poll() is not None for p in procs):
      raise AssertionError("a process ended before the signal: " + "\n".join(_outputs(procs, "the run")))
    time.sleep(0.05)
  raise AssertionError(f"no {n} rows in {path} after {timeout_s} s")


def _straight(tmp, rounds: int = ROUNDS) -> list[dict]:
  run = tmp / "runs" / f"straight{rounds}"
  if not run.is_dir():
    r = subprocess.run(_cli_args(tmp, f"straight{rounds}", rounds) + ["--quiet"], cwd=ROOT, env=_cli_env(tmp),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
  return _rows(run)


def test_sigterm_to_a_single_process_run_saves_the_round_and_resume_equals_a_straight_run(tiny):
  args = _cli_args(tiny, "single", ROUNDS) + NO_REGULAR_SAVE + ["--quiet"]
  p = children.popen(args, cwd=ROOT, env=_cli_env(tiny), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  run = tiny / "runs" / "single"
  _wait_for_rows(run, 1, [p])
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 143, err[-3000:]
  stopped = len(_rows(run))
  assert stopped < ROUNDS and "Traceback" not in err
  assert err.strip().splitlines()[-1] == (f"stopped by SIGTERM at round {stopped}; the round is checkpointed and "
                                          "--resume continues")
  assert sorted(x.name for x in (run / "state").iterdir()) == [str(stopped)]
  r = subprocess.run(args + ["--resume"], cwd=ROOT, env=_cli_env(tiny), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  drop = lambda rows: [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]
  assert drop(_rows(run)) == drop(_straight(tiny))


@pytest.mark.slow
def test_sigterm_to_one_process_of_two_stops_both_at_one_round_and_resume_equals_a_straight_run(tiny):
  port = _free_port()
  args = _cli_args(tiny, "job", JOB_ROUNDS) + NO_REGULAR_SAVE + ["--quiet"]

  def job(extra=()):
    return [children.popen(args + list(extra) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                                   "--process-id", str(i), "--init-timeout", "60"],
                             cwd=ROOT, env=_cli_env(tiny), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(2)]

  procs = job()
  run = tiny / "runs" / "job"
  _wait_for_rows(run, 1, procs)
  procs[1].send_signal(signal.SIGTERM)  # not the process that writes: the job must still agree
  logs = _outputs(procs, "the two-process job")
  stopped = len(_rows(run))
  assert stopped < JOB_ROUNDS, logs[0][-2000:]
  for p, log in zip(procs, logs):
    assert p.returncode == 143, log[-3000:]
    assert f"stopped by SIGTERM at round {stopped}; the round is checkpointed and --resume continues" in log
  assert sorted(x.name for x in (run / "state").iterdir()) == [str(stopped)]
  port = _free_port()
  procs = job(["--resume"])
  logs = _outputs(procs, "the resumed job")
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:]
  _assert_rows_close(_rows(run), _straight(tiny, JOB_ROUNDS))


def _children(pid: int) -> list[int]:
  out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
  return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
  return state not in ("Z", "X")


def test_killing_kill_resume_leaves_no_process_behind(tmp_path):
  script = children.popen([sys.executable, "-m", "benchmarks.kill_resume", "--rounds", "200", "--kills", "1",
                             "--out", str(tmp_path)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  kids = []
  while time.time() < deadline and not kids:
    kids = _children(script.pid)
    time.sleep(0.1)
  assert kids, "kill_resume started no run"
  script.kill()  # SIGKILL: nothing of the script's own runs
  script.wait()
  deadline = time.time() + 120
  while time.time() < deadline and any(_alive(k) for k in kids):
    time.sleep(0.2)
  assert not any(_alive(k) for k in kids), f"children {kids} outlived kill_resume"
