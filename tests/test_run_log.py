"""Run log summary: model selection by validation accuracy."""

from a2v_jax.run.log import RunLog, best_by_val


def _row(r, clip_val, t5_val, clip_test):
  return {"round": r, "round_seconds": 0.1, "test/server/clip_accuracy_on_val": clip_val,
          "test/server/t5_accuracy_on_val": t5_val, "test/server/clip_accuracy_on_test": clip_test,
          "train/node_0/clip_loss": 0.5}


def test_best_by_val_uses_the_mean_over_branches_and_ignores_test():
  rows = [_row(1, 0.5, 0.5, 0.99), {"round": 2, "round_seconds": 0.1, "train/node_0/clip_loss": 0.4},
          _row(3, 0.9, 0.3, 0.10), _row(4, 0.7, 0.6, 0.70), _row(5, 0.6, 0.7, 0.60)]
  best = best_by_val(rows)
  assert best["round"] == 5  # 0.65 ties round 4; the later round wins; round 3 has the best clip only
  assert best["test/server/clip_accuracy_on_test"] == 0.60
  assert "train/node_0/clip_loss" not in best
  assert best_by_val([{"round": 1, "train/node_0/clip_loss": 0.4}]) is None


def test_summary_holds_final_and_best(tmp_path, capsys):
  log = RunLog(tmp_path / "run", resume=False, verbose=True)
  for row in (_row(1, 0.8, 0.8, 0.9), _row(2, 0.5, 0.5, 0.4)):
    log.append(row)
  summary = log.finish(None)
  assert summary["final"]["test/server/clip_accuracy_on_test"] == 0.4
  assert summary["best_by_val"]["round"] == 1
  assert "best round by validation accuracy: 1" in capsys.readouterr().out


def _log_with(tmp_path, text):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text(text)
  return run


def test_a_torn_last_line_is_set_aside_with_a_warning(tmp_path, capsys):
  import json
  good = "".join(json.dumps({"round": r, "train/node_0/clip_loss": 0.5 / r}) + "\n" for r in (1, 2))
  torn = '{"round": 3, "train/node_0/cl'
  run = _log_with(tmp_path, good + torn)
  log = RunLog(run, resume=True, verbose=False)
  assert [r["round"] for r in log.rows] == [1, 2]
  err = capsys.readouterr().err
  assert f"warning: the last line of {run / 'metrics.jsonl'} is incomplete" in err and "metrics.jsonl.torn" in err
  assert (run / "metrics.jsonl").read_text() == good
  assert (run / "metrics.jsonl.torn").read_text() == torn + "\n"
  log.append({"round": 3, "train/node_0/clip_loss": 0.1})
  log.close()
  assert [json.loads(l)["round"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_corrupt_line_before_the_last_stops_naming_it(tmp_path):
  import pytest
  from a2v_jax.run.log import RunDirError
  run = _log_with(tmp_path, '{"round": 1}\n{"round": 2, oops}\n{"round": 3}\n')
  with pytest.raises(RunDirError, match=r"metrics.jsonl line 2 is corrupt"):
    RunLog(run, resume=True, verbose=False)
  from a2v_jax.run import lock
  lock.acquire(run).release()  # the refused log released the directory's lock


def test_disk_full_while_writing_metrics_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  import csv
  import errno
  import pytest
  from a2v_jax.checkpoint import DiskFullError
  log = RunLog(tmp_path / "run", resume=False, verbose=False)
  log.append({"round": 1, "x": 1.0})

  def full(self, rows):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(csv.DictWriter, "writerows", full)
  with pytest.raises(DiskFullError, match=rf"disk full while writing {tmp_path / 'run' / 'metrics.csv'} .*--resume"):
    log.append({"round": 2, "x": 2.0})
  log.close()
  assert not (tmp_path / "run" / "metrics.csv.tmp").exists()
  assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == ["metrics.csv", "metrics.jsonl"]
