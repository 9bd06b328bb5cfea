"""experiments.seeds: mean and spread over seeds; finished seeds reused, interrupted ones resumed, others refused."""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import seeds

ROOT = Path(__file__).resolve().parents[1]


def _summary(clip, t5, best_round=None):
  s = {"final": {"test/server/clip_accuracy_on_test": clip, "test/server/t5_accuracy_on_test": t5,
                 "test/server/clip_accuracy_on_val": 0.5, "train/ignored": 1.0}}
  if best_round is not None:
    s["best_by_val"] = {"round": best_round, "test/server/clip_accuracy_on_test": clip - 0.01,
                        "test/server/t5_accuracy_on_test": t5 - 0.02}
  return s


def test_spread_matches_numpy_and_keeps_only_shared_sections():
  out = seeds.spread({0: _summary(0.9, 0.8, 10), 1: _summary(0.7, 0.85, 30), 5: _summary(0.8, 0.6, 20)})
  clip = out["final"]["clip_accuracy_on_test"]
  v = np.array([0.9, 0.7, 0.8])
  assert clip["seeds"] == {"0": 0.9, "1": 0.7, "5": 0.8}
  assert clip["mean"] == pytest.approx(v.mean()) and clip["std"] == pytest.approx(v.std(ddof=1))
  assert (clip["min"], clip["max"]) == (0.7, 0.9)
  assert set(out["final"]) == {"clip_accuracy_on_test", "t5_accuracy_on_test"}  # test split, server only
  assert out["best_by_val"]["round"]["mean"] == pytest.approx(20.0)
  assert out["best_by_val"]["t5_accuracy_on_test"]["mean"] == pytest.approx(np.mean([0.78, 0.83, 0.58]))
  one = seeds.spread({0: _summary(0.9, 0.8, 10), 1: _summary(0.7, 0.85)})
  assert "best_by_val" not in one and one["final"]["t5_accuracy_on_test"]["std"] > 0
  assert seeds.spread({3: _summary(0.9, 0.8)})["final"]["clip_accuracy_on_test"]["std"] == 0.0


@pytest.mark.parametrize("bad", ["", "a,b", "1,1", "-1"])
def test_bad_seed_lists_are_refused(bad):
  with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
    seeds.parse_seeds(bad)


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "data" / "fsdd" / "recordings").is_dir(), reason="FSDD not present")
def test_seeds_cli_runs_reuses_resumes_and_refuses(tmp_path, capsys):
  from a2v_jax import config
  from a2v_jax.backbones.paths import backbone_dir
  from tests.test_distributed import CLI_SETTINGS
  tiny = config.load(None, [f'tiny_dir="{tmp_path / "backbones"}"'])
  for kind in ("ast", "clip_text", "t5"):
    backbone_dir(tiny, kind)
  bb = tmp_path / "backbones"
  sets = CLI_SETTINGS + ["global_rounds=2", f'output_dir="{tmp_path / "runs"}"', 'name="grid"',
                         f'cache_dir="{tmp_path / "cache"}"', f'ast_model="{bb / "ast"}"',
                         f'clip_text_model="{bb / "clip_text"}"', f't5_model="{bb / "t5"}"']
  argv = ["--config", str(ROOT / "experiments/configs/fsdd_tiny.json"), "--seeds", "0,1", "--quiet"]
  argv += [a for kv in sets for a in ("--set", kv)]
  runs = tmp_path / "runs"

  assert seeds.main(argv) == 0
  result = json.loads((runs / "grid_seeds.json").read_text())
  finals = [json.loads((runs / f"grid_seed{s}" / "summary.json").read_text())["final"] for s in (0, 1)]
  for k in ("clip_accuracy_on_test", "t5_nmse_on_test"):
    st = result["spread"]["final"][k]
    assert st["mean"] == pytest.approx(np.mean([f[f"test/server/{k}"] for f in finals]))
  assert json.loads((runs / "grid_seed1" / "config.json").read_text())["experiment"]["seed"] == 1
  assert (runs / "grid_seeds.csv").read_text().splitlines()[0].startswith("section,metric,seed_0,seed_1,mean")

  # Rerun: both seeds reused (nothing retrained). Seed 1 "interrupted" after round 1: resumed to round 2.
  seed0_rows = (runs / "grid_seed0" / "metrics.jsonl").read_text()
  seed1 = runs / "grid_seed1"
  rows1 = (seed1 / "metrics.jsonl").read_text().splitlines()
  (seed1 / "summary.json").unlink()
  (seed1 / "metrics.jsonl").write_text(rows1[0] + "\n")
  shutil.rmtree(seed1 / "state" / "2")
  capsys.readouterr()
  assert seeds.main([a for a in argv if a != "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "seed 0: finished earlier, reusing" in out and "seed 1: resuming" in out and "resumed from round 1" in out
  assert (runs / "grid_seed0" / "metrics.jsonl").read_text() == seed0_rows
  again = json.loads((runs / "grid_seeds.json").read_text())["spread"]["final"]
  for k, st in result["spread"]["final"].items():  # the resumed seed ends where the straight run did
    assert again[k]["mean"] == pytest.approx(st["mean"], rel=1e-5, abs=1e-6), k

  # The same names with another config: refused, nothing overwritten.
  before = (runs / "grid_seeds.json").read_text()
  assert seeds.main(argv + ["--set", "clip_adapter_learning_rate=0.5"]) == 2
  assert "holds a run of another config" in capsys.readouterr().err
  assert (runs / "grid_seeds.json").read_text() == before
