"""Trainer stages on synthetic prepared data: resume equals straight run, refusals, NaN stop."""

import json

import numpy as np
import pytest

from a2v_jax import config
from a2v_jax.checkpoint import CheckpointError
from a2v_jax.run_log import RunDirError
from a2v_jax.trainer import TrainingError, train_and_evaluate
from tests.fakes import synthetic_prepared

BASE = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]",
        "map_heads=2", "num_nodes=3", "checkpoint_frequency=1"]


def _cfg(tmp_path, name, *extra):
  return config.load(None, BASE + [f'output_dir="{tmp_path}"', f'name="{name}"', *extra])


def _server_rows(run_dir):
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k.startswith(("test/", "train/"))} for r in rows]


@pytest.mark.parametrize("correction", ["none", "scaffold"])  # scaffold: control variates in the state too
def test_resume_gives_identical_metrics(tmp_path, correction):
  prep = synthetic_prepared()
  c = f'local_drift_correction="{correction}"'
  straight = train_and_evaluate(_cfg(tmp_path, "straight", "global_rounds=4", c), verbose=False, prepared=prep)
  train_and_evaluate(_cfg(tmp_path, "split", "global_rounds=2", c), verbose=False, prepared=prep)
  resumed = train_and_evaluate(_cfg(tmp_path, "split", "global_rounds=4", c), resume=True, verbose=False,
                               prepared=prep)
  a, b = _server_rows(tmp_path / "straight"), _server_rows(tmp_path / "split")
  assert len(a) == len(b) == 4
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), k
  assert straight["final"] == pytest.approx(resumed["final"])
  assert (tmp_path / "split" / "metrics.csv").is_file() and (tmp_path / "split" / "plot.png").is_file()


def test_resume_without_a_checkpoint_recomputes_the_logged_rounds(tmp_path):
  """Killed before its first checkpoint: --resume starts at round 0 and does not keep the old rows twice."""
  import shutil
  prep = synthetic_prepared()
  straight = train_and_evaluate(_cfg(tmp_path, "r", "global_rounds=2"), verbose=False, prepared=prep)
  before = _server_rows(tmp_path / "r")
  shutil.rmtree(tmp_path / "r" / "state")
  again = train_and_evaluate(_cfg(tmp_path, "r", "global_rounds=2"), resume=True, verbose=False, prepared=prep)
  after = _server_rows(tmp_path / "r")
  assert len(after) == len(before) == 2
  for ra, rb in zip(before, after):
    assert ra == pytest.approx(rb, rel=1e-6, abs=1e-7)
  assert again["final"] == pytest.approx(straight["final"])


def test_existing_run_is_not_overwritten(tmp_path):
  prep = synthetic_prepared()
  train_and_evaluate(_cfg(tmp_path, "r", "global_rounds=1"), verbose=False, prepared=prep)
  before = (tmp_path / "r" / "metrics.jsonl").read_text()
  with pytest.raises(RunDirError, match="--resume"):
    train_and_evaluate(_cfg(tmp_path, "r", "global_rounds=1"), verbose=False, prepared=prep)
  assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_resume_with_other_config_is_refused(tmp_path):
  prep = synthetic_prepared()
  train_and_evaluate(_cfg(tmp_path, "r", "global_rounds=1"), verbose=False, prepared=prep)
  with pytest.raises(CheckpointError, match="clip_adapter_learning_rate"):
    train_and_evaluate(_cfg(tmp_path, "r", "global_rounds=2", "clip_adapter_learning_rate=0.5"),
                       resume=True, verbose=False, prepared=prep)


def test_nan_loss_stops_with_round_and_node(tmp_path):
  prep = synthetic_prepared()
  prep.features[prep.nodes.nodes[1]["train"][0]] = np.nan
  with pytest.raises(TrainingError, match=r"round 1 at node\(s\) \[1\]"):
    train_and_evaluate(_cfg(tmp_path, "nan", "global_rounds=2"), verbose=False, prepared=prep)


def test_modes_report_server_metrics(tmp_path):
  prep = synthetic_prepared()
  for mode in ("none", "centralised", "weighted"):
    s = train_and_evaluate(_cfg(tmp_path, mode, "global_rounds=1", f'adapter_aggregation_mode="{mode}"'),
                           verbose=False, prepared=prep)
    assert 0.0 <= s["final"]["test/server/clip_accuracy_on_test"] <= 1.0
    assert s["compiled_round_programs"] == 1


def test_embeddings_checkpoints_are_written_by_the_run(tmp_path):
  from a2v_jax.embeddings_io import load_embeddings
  prep = synthetic_prepared()
  cfg = _cfg(tmp_path, "emb", "global_rounds=2", "save_embeddings_instead_of_images=true",
             "embeddings_save_frequency=2")
  train_and_evaluate(cfg, verbose=False, prepared=prep)
  files = sorted(p.name for p in (tmp_path / "emb" / "embeddings").iterdir())
  assert files == ["node_0_embeddings_r2.safetensors", "node_1_embeddings_r2.safetensors",
                   "node_2_embeddings_r2.safetensors", "server_embeddings_r2.safetensors"]
  server = load_embeddings(tmp_path / "emb" / "embeddings" / "server_embeddings_r2.safetensors")
  n = sum(len(node["val"]) + len(node["test"]) for node in prep.nodes.nodes)
  assert server.embeddings["clip"].shape == (n, 4) and server.embeddings["t5"].shape == (n, 3, 6)
