"""One writer per run directory: a second run is refused at once; a killed holder blocks nobody."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from a2v_jax import config
from a2v_jax.run import children
from a2v_jax.run import lock as run_lock
from a2v_jax.run.log import RunLog
from a2v_jax.run.trainer import train_and_evaluate
from tests.fakes import synthetic_prepared

BASE = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]",
        "map_heads=2", "num_nodes=3", "checkpoint_frequency=1", "global_rounds=2"]

HOLD = textwrap.dedent("""
    import sys, time
    from a2v_jax.run import lock as run_lock
    run_lock.acquire(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def _holder(run_dir):
  """A separate process that takes the lock of ``run_dir`` and keeps it until killed."""
  run_dir.mkdir(parents=True, exist_ok=True)
  p = children.popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert p.stdout.readline().strip() == "locked"
  return p


def _kill(p):
  p.send_signal(signal.SIGKILL)
  p.wait(timeout=30)


def test_second_process_is_refused_naming_directory_and_holder_then_a_killed_holder_blocks_nobody(tmp_path):
  run_dir = tmp_path / "runs" / "exp"
  p = _holder(run_dir)
  try:
    with pytest.raises(run_lock.RunLockedError) as e:
      run_lock.acquire(run_dir)
    assert str(run_dir) in str(e.value) and f"pid {p.pid}" in str(e.value)
  finally:
    _kill(p)
  assert (run_dir / run_lock.LOCK_NAME).exists()  # kill -9 leaves the file; the kernel dropped the lock
  lock = run_lock.acquire(run_dir)
  assert lock.held and (run_dir / run_lock.LOCK_NAME).read_text().split()[0] == str(os.getpid())
  lock.release()
  assert not (run_dir / run_lock.LOCK_NAME).exists() and not lock.held
  lock.release()  # idempotent


def test_a_locked_run_writes_nothing_and_a_finished_run_releases_its_lock(tmp_path):
  prep = synthetic_prepared()
  cfg = config.load(None, BASE + [f'output_dir="{tmp_path}"', 'name="exp"'])
  p = _holder(tmp_path / "exp")
  try:
    with pytest.raises(run_lock.RunLockedError, match="in use by another run"):
      train_and_evaluate(cfg, verbose=False, prepared=prep)
  finally:
    _kill(p)
  assert sorted(x.name for x in (tmp_path / "exp").iterdir()) == [run_lock.LOCK_NAME]  # no rows, no state
  train_and_evaluate(cfg, verbose=False, prepared=prep)
  assert not (tmp_path / "exp" / run_lock.LOCK_NAME).exists()
  assert len((tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()) == 2
  # The same directory again from this process: the "already holds a run" refusal, not a lock problem.
  with pytest.raises(Exception, match="already holds a run"):
    RunLog(tmp_path / "exp", resume=False, verbose=False)
  assert not (tmp_path / "exp" / run_lock.LOCK_NAME).exists()


def test_cli_refuses_a_locked_run_directory_with_one_line(tmp_path, capsys):
  from experiments import run
  p = _holder(tmp_path / "fsdd_tiny")
  try:
    status = run.main(["--config", "experiments/configs/fsdd_tiny.json", "--set", f'output_dir="{tmp_path}"',
                       "--quiet"])
  finally:
    _kill(p)
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2
  assert len(err) == 1 and err[0].startswith("run directory locked: ") and f"pid {p.pid}" in err[0], err
