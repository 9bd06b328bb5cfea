"""Trainer stages on synthetic prepared data: resume equals straight run, refusals, NaN stop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from a2v_jax import config
from a2v_jax.checkpoint import CheckpointError
from a2v_jax.models.heads import make_heads
from a2v_jax.run.log import RunDirError
from a2v_jax.run.trainer import TrainingError, train_and_evaluate
from tests.fakes import synthetic_prepared

BASE = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]",
        "map_heads=2", "num_nodes=3", "checkpoint_frequency=1"]


def _cfg(tmp_path, name, *extra):
  return config.load(None, BASE + [f'output_dir="{tmp_path}"', f'name="{name}"', *extra])


def _server_rows(run_dir):
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k.startswith(("test/", "train/"))} for r in rows]


def _last_state(run_dir):
  """(round, the raw pytree of the run's latest round checkpoint), read with orbax alone."""
  last = max(int(p.name) for p in (run_dir / "state").iterdir() if p.name.isdigit())
  return last, ocp.StandardCheckpointer().restore((run_dir / "state" / str(last) / "state").absolute())


# join_ratio < 1: 2 of 3 nodes sampled per round, so the sampling key must survive the checkpoint too;
# scaffold: control variates in the state too (full participation: the unsampled path of the round).
@pytest.mark.parametrize("correction, join_ratio, rounds", [("none", 0.67, 6), ("scaffold", 1.0, 4)])
def test_resume_gives_identical_metrics(tmp_path, correction, join_ratio, rounds):
  prep = synthetic_prepared()
  c = (f'local_drift_correction="{correction}"', f"join_ratio={join_ratio}")
  half = rounds // 2
  straight = train_and_evaluate(_cfg(tmp_path, "straight", f"global_rounds={rounds}", *c), verbose=False,
                                prepared=prep)
  train_and_evaluate(_cfg(tmp_path, "split", f"global_rounds={half}", *c), verbose=False, prepared=prep)
  resumed = train_and_evaluate(_cfg(tmp_path, "split", f"global_rounds={rounds}", *c), resume=True, verbose=False,
                               prepared=prep)
  a, b = _server_rows(tmp_path / "straight"), _server_rows(tmp_path / "split")
  assert len(a) == len(b) == rounds
  assert a == b  # bit-for-bit: the same programs on the same restored bits
  assert straight["final"] == resumed["final"]
  (ra, sa), (rb, sb) = _last_state(tmp_path / "straight"), _last_state(tmp_path / "split")
  assert ra == rb == rounds
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(x, y)
  # Which nodes trained in a round, read off the rows (a node left out trains on no rows: loss 0.0).
  trained = [tuple(r[f"train/node_{i}/clip_loss"] != 0.0 for i in range(3)) for r in a]
  if join_ratio < 1:
    assert all(sum(t) == 2 for t in trained) and len(set(trained)) > 1, trained
    assert len(set(trained[half:])) > 1, trained  # the resumed rounds resample (seed 0: rounds 1-4 drew nodes 0, 1)
  else:
    assert all(all(t) for t in trained)
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
  from a2v_jax.render.embeddings_io import load_embeddings
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


def _numpy_metrics(pred, labels, table):
  """The evaluator's metrics of one branch, in float64 numpy: nearest target by cosine, centred cosine, mse."""
  n, c = len(pred), len(table)
  p = np.asarray(pred, np.float64).reshape(n, -1)
  t = np.asarray(table, np.float64).reshape(c, -1)
  y = t[labels]
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  mu = t.mean(0)
  mse = np.mean((p - y) ** 2)
  return {"accuracy": np.mean(np.argmax(unit(p) @ unit(t).T, 1) == labels),
          "centred_cosine": np.mean(np.sum(unit(p - mu) * unit(y - mu), 1)),
          "mse": mse, "nmse": mse / np.mean(t.var(0))}


def test_reported_metrics_equal_a_numpy_recomputation_from_the_models_predictions(tmp_path):
  """Every test/* number of a round row, recomputed from the checkpointed heads' predictions on the real rows.

  The split sizes are not multiples of batch_size, so the evaluator pads them (with row 0, a real clip):
  counting those padding rows, or evaluating the wrong model or split, changes the numbers.
  """
  prep = synthetic_prepared()
  cfg = _cfg(tmp_path, "m", "global_rounds=1", "join_ratio=0.67")
  bs, nodes = cfg.train.batch_size, prep.nodes.nodes
  for split in ("val", "test"):
    assert sum(len(n[split]) for n in nodes) % bs != 0
    assert any(len(n[split]) % bs for n in nodes)
  train_and_evaluate(cfg, verbose=False, prepared=prep)
  row = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
  last, state = _last_state(tmp_path / "m")
  assert last == row["round"] == 1

  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prep.targets.items()})
  labels = prep.nodes.clipset.labels

  def recompute(params, rows):
    out = heads.apply({"params": params}, jnp.asarray(prep.features[rows]))
    return {f"{b}_{k}": v for b, o in out.items()
            for k, v in _numpy_metrics(o, labels[rows], prep.targets[b]).items()}

  expected = {}
  for split in ("val", "test"):
    union = np.concatenate([n[split] for n in nodes])
    for k, v in recompute(state["server"]["params"], union).items():
      expected[f"test/server/{k}_on_{split}"] = v
    for i, n in enumerate(nodes):
      own = jax.tree.map(lambda x: x[i], state["clients"]["params"])
      for k, v in recompute(own, np.asarray(n[split])).items():
        expected[f"test/node_{i}/{k}_on_{split}"] = v
  reported = {k: v for k, v in row.items() if k.startswith("test/")}
  assert reported.keys() == expected.keys()
  for k, v in expected.items():
    assert reported[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
