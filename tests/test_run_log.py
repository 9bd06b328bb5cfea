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
