"""wandb mirror: same rows and names as metrics.jsonl, offline by default, clear error without wandb."""

import json
import sys
import types

import pytest

from a2v_jax import config
from a2v_jax.run.trainer import train_and_evaluate
from a2v_jax.run.wandb_sink import WandbMissingError
from tests.fakes import synthetic_prepared

BASE = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]",
        "map_heads=2", "num_nodes=3", "global_rounds=2"]


class _FakeRun:
  def __init__(self, **kwargs):
    self.init_kwargs, self.logged, self.summary, self.finished = kwargs, [], {}, False

  def log(self, data, step):
    self.logged.append((step, dict(data)))

  def finish(self):
    self.finished = True


def test_rows_are_mirrored_offline(tmp_path, monkeypatch):
  runs = []
  fake = types.ModuleType("wandb")
  fake.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
  monkeypatch.setitem(sys.modules, "wandb", fake)
  monkeypatch.delenv("WANDB_MODE", raising=False)
  cfg = config.load(None, BASE + [f'output_dir="{tmp_path}"', 'name="w"', "wandb=true"])
  summary = train_and_evaluate(cfg, verbose=False, prepared=synthetic_prepared())
  (run,) = runs
  assert run.init_kwargs["mode"] == "offline" and run.init_kwargs["dir"] == str(tmp_path / "w")
  rows = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert [s for s, _ in run.logged] == [r["round"] for r in rows] == [1, 2]
  for (_, data), row in zip(run.logged, rows):
    assert data == {k: v for k, v in row.items() if k != "round"}
  assert any(k.startswith("test/server/") for k in run.logged[-1][1])
  assert run.finished and run.summary == summary["final"]


def test_missing_wandb_is_a_clear_error_before_training(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
  cfg = config.load(None, BASE + [f'output_dir="{tmp_path}"', 'name="w"', "wandb=true"])
  with pytest.raises(WandbMissingError, match="pip install wandb"):
    train_and_evaluate(cfg, verbose=False, prepared=synthetic_prepared())
  assert not (tmp_path / "w" / "metrics.jsonl").exists()
