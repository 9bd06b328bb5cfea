"""End-of-round outputs: schedule, embeddings checkpoints, in-training rendering (tiny models)."""

import logging

import numpy as np
import pytest

from a2v_jax import config as config_lib
from a2v_jax.render import embeddings_io as eio
from a2v_jax.backbones.paths import TINY_CLIP_DIM, TINY_T5_DIM
from a2v_jax.render import round_outputs as ro
from a2v_jax.render.round_outputs import RoundOutputs, due, embeddings_dir, eval_rows, pick_per_class

CLASSES = ("zero", "one", "rail_transport")
BS = 4  # train.batch_size
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
CLIP_IDS = tuple(f"clip_{j}" for j in range(len(LABELS)))
# Two nodes; node 1 has no test clips.
NODES = (
    {"train": np.array([0, 1, 2, 3]), "val": np.array([4, 5]), "test": np.array([6, 7, 8])},
    {"train": np.array([9, 10, 11]), "val": np.array([12, 13, 14, 15, 16]), "test": np.array([], np.int64)},
)
SERVER_W, CLIENT_W = 0.5, np.array([0.0, 0.25, 9.0])  # the third client row is padding


def make_cfg(tmp_path, diffusion_type="flux", mode="avg", **output):
  return config_lib.from_dict({
      "experiment": {"seed": 3}, "data": {"num_nodes": 2},
      "federation": {"adapter_aggregation_mode": mode},
      "heads": {"diffusion_type": diffusion_type}, "train": {"batch_size": BS},
      "backbones": {"tiny_dir": str(tmp_path)}, "output": output})


def fake_predict(diffusion_type, calls):
  """Embeddings of the tiny text-encoder widths whose value encodes (params, clip row, branch)."""

  def predict(params, idx):
    assert len(idx) == ro.PREDICT_BATCHES * BS, len(idx)  # one shape: one compile per run
    calls.append(len(idx))
    v = 0.01 * np.asarray(idx, np.float32) + params["w"]
    if diffusion_type == "flux":
      return {"clip": np.repeat(v[:, None], TINY_CLIP_DIM, 1),
              "t5": -np.broadcast_to(v[:, None, None], (len(v), 17, TINY_T5_DIM)).copy()}
    if diffusion_type == "sd":
      return {"clip": np.broadcast_to(v[:, None, None], (len(v), 77, TINY_CLIP_DIM)).copy()}
    return {"t5": np.broadcast_to(v[:, None, None], (len(v), 17, TINY_T5_DIM)).copy()}
  return predict


def call(outputs, round_, diffusion_type="flux", calls=None):
  return outputs(round_, predict_fn=fake_predict(diffusion_type, [] if calls is None else calls),
                 server_params={"w": np.float32(SERVER_W)}, client_params={"w": CLIENT_W},
                 node_splits=NODES, labels=LABELS)


# --- schedule and helpers --------------------------------------------------------------------------


def test_schedule_helpers_and_modes(tmp_path, caplog):
  assert [r for r in range(1, 9) if due(r, 3)] == [3, 6] and not any(due(r, 0) for r in range(1, 5))
  cfg = make_cfg(tmp_path)
  assert embeddings_dir(cfg, tmp_path / "run") == tmp_path / "run" / "embeddings"
  other = make_cfg(tmp_path, embeddings_checkpoint_dir="elsewhere/emb")
  assert str(embeddings_dir(other, tmp_path / "run")) == "elsewhere/emb"
  idx, splits = eval_rows(NODES[0])
  assert idx.tolist() == [4, 5, 6, 7, 8] and splits == ["val", "val", "test", "test", "test"]
  assert pick_per_class(np.array([4, 5, 6, 7, 8]), LABELS, 1).tolist() == [6, 4, 5]

  def outs(**kw):
    return RoundOutputs(make_cfg(tmp_path, **kw), tmp_path / "run", CLASSES, CLIP_IDS, "h")
  assert not any(outs().wants(r) for r in range(1, 5))  # defaults: nothing
  emb = outs(save_embeddings_instead_of_images=True, embeddings_save_frequency=2,
             generate_global_images_frequency=1)
  assert [r for r in range(1, 6) if emb.wants(r)] == [2, 4]  # embeddings-only: no images
  img = outs(generate_global_images_frequency=2, generate_nodes_images_frequency=3)
  assert [r for r in range(1, 7) if img.wants(r)] == [2, 3, 4, 6]
  run1 = config_lib.from_dict({**make_cfg(tmp_path, generate_global_images_frequency=1).to_dict(),
                               "generators": {"use_generator": True, "generator_only_mode": True}})
  assert not RoundOutputs(run1, tmp_path, CLASSES, CLIP_IDS, "h").wants(1)  # Run 1: no heads
  with caplog.at_level(logging.WARNING):
    outs(save_embeddings_instead_of_images=True)
  assert "no embeddings checkpoint will be written" in caplog.text
  with pytest.raises(ValueError, match="render_node"):
    outs(generate_nodes_images_frequency=1, render_node=2)
  # cogx: one clear message, nothing to render, no crash.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    cogx = RoundOutputs(make_cfg(tmp_path, "cogx", generate_global_images_frequency=1),
                        tmp_path / "run", CLASSES, CLIP_IDS, "h")
  assert "no renderer" in caplog.text and not cogx.wants(1)
  assert call(cogx, 1, "cogx") == {}
  # No server model without aggregation; no federated nodes when centralised.
  for mode, want in (("none", False), ("centralised", True)):
    c = make_cfg(tmp_path, mode=mode, generate_global_images_frequency=1)
    assert RoundOutputs(c, tmp_path, CLASSES, CLIP_IDS, "h").wants(1) is want


# --- embeddings checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("diffusion_type,chunk_batches", [("flux", 8), ("sd", 1)])
def test_embeddings_checkpoints_round_trip(tmp_path, monkeypatch, diffusion_type, chunk_batches):
  monkeypatch.setattr(ro, "PREDICT_BATCHES", chunk_batches)  # 1: several chunks per file
  cfg = make_cfg(tmp_path, diffusion_type, save_embeddings_instead_of_images=True,
                 embeddings_save_frequency=2)
  outputs = RoundOutputs(cfg, tmp_path / "run", CLASSES, CLIP_IDS, cfg.hash())
  calls = []
  assert call(outputs, 1, diffusion_type, calls) == {} and calls == []
  m = call(outputs, 2, diffusion_type, calls)
  assert set(m) == {"outputs_seconds"}
  folder = tmp_path / "run" / "embeddings"
  assert sorted(p.name for p in folder.iterdir()) == [
      "node_0_embeddings_r2.safetensors", "node_1_embeddings_r2.safetensors",
      "server_embeddings_r2.safetensors"]
  expect = {0: ([4, 5, 6, 7, 8], CLIENT_W[0]), 1: ([12, 13, 14, 15, 16], CLIENT_W[1]),
            "server": ([4, 5, 6, 7, 8, 12, 13, 14, 15, 16], SERVER_W)}
  for node, (rows, w) in expect.items():
    ef = eio.load_embeddings(folder / eio.embeddings_filename(node, 2))
    n = len(rows)
    assert (ef.node, ef.round, ef.diffusion_type, ef.config_hash) == (node, 2, diffusion_type, cfg.hash())
    assert ef.sample_ids == tuple(CLIP_IDS[j] for j in rows)
    assert ef.class_names == tuple(CLASSES[LABELS[j]] for j in rows)
    assert ef.splits == tuple("test" if 6 <= j <= 8 else "val" for j in rows)
    v = 0.01 * np.asarray(rows, np.float32) + np.float32(w)  # this model's rows, padding dropped
    if diffusion_type == "flux":
      assert ef.embeddings["clip"].shape == (n, TINY_CLIP_DIM)
      assert ef.embeddings["t5"].shape == (n, 17, TINY_T5_DIM)
      np.testing.assert_allclose(ef.embeddings["clip"][:, 0], v, rtol=1e-6)
      np.testing.assert_allclose(ef.embeddings["t5"][:, 0, 0], -v, rtol=1e-6)
    else:
      assert set(ef.embeddings) == {"clip"} and ef.embeddings["clip"].shape == (n, 77, TINY_CLIP_DIM)
      np.testing.assert_allclose(ef.embeddings["clip"][:, 0, 0], v, rtol=1e-6)
  # node 0, node 1, server: 5, 5 and 10 rows in chunks of chunk_batches * BS rows.
  assert len(calls) == (3 if chunk_batches == 8 else 2 + 2 + 3)
  assert not (tmp_path / "run" / "images").exists()


# --- in-training rendering (tiny FLUX / SD + tiny CLIP) ---------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """One tiny_dir for both render tests: the tiny CLIP scorer is written once."""
  return tmp_path_factory.mktemp("tiny")


def _pngs(folder):
  return sorted(p.name for p in folder.iterdir())


def test_render_flux_in_training(tiny, monkeypatch):
  cfg = make_cfg(tiny, "flux", generate_global_images_frequency=1, generate_nodes_images_frequency=2,
                 render_node=1, images_per_class=2, num_inference_steps=1, guidance_scale=0.0)
  run = tiny / "flux_run"
  outputs = RoundOutputs(cfg, run, CLASSES, CLIP_IDS, "h")
  m1 = call(outputs, 1)
  keys = {f"test/server/image_{k}" for k in ("accuracy", "balanced_accuracy", "f1_score")}
  assert set(m1) == keys | {"outputs_seconds"}
  assert all(0.0 <= m1[k] <= 1.0 for k in keys)
  server = run / "images" / "round_001" / "server"
  # 2 per class from the val+test pool [4..8, 12..16]: zero {6, 12}, one {4, 7}, rail {5, 8}.
  assert _pngs(server) == [
      "one_clip_4.png", "one_clip_7.png", "rail_transport_clip_5.png", "rail_transport_clip_8.png",
      "sheet_one.png", "sheet_rail_transport.png", "sheet_zero.png", "zero_clip_12.png", "zero_clip_6.png"]
  from PIL import Image
  assert np.asarray(Image.open(server / "zero_clip_6.png")).shape == (32, 32, 3)
  assert not (run / "images" / "round_001" / "node_1").exists()

  # Round 2: node 1 too; the renderer is the one loaded in round 1; t5 -> prompt_embeds.
  renderer = outputs.renderer
  seen = []
  real = renderer.flux.pipe

  def spy(**kw):
    seen.append((kw["prompt_embeds"].numpy().copy(), kw["pooled_prompt_embeds"].numpy().copy()))
    return real(**kw)
  monkeypatch.setattr(renderer.flux, "pipe", spy)
  m2 = call(outputs, 2)
  assert outputs.renderer is renderer
  assert {k for k in m2 if k.startswith("test/node_1/")} == {k.replace("server", "node_1") for k in keys}
  node = run / "images" / "round_002" / "node_1"
  # node 1's pool is [12..16]: zero {12, 15}, one {13, 16}, rail {14}.
  assert len([p for p in _pngs(node) if not p.startswith("sheet_")]) == 5
  assert "zero_clip_15.png" in _pngs(node) and len(list(node.glob("sheet_*.png"))) == 3
  t5 = np.concatenate([t for t, _ in seen])
  pooled = np.concatenate([c for _, c in seen])
  assert t5.shape[1:] == (17, TINY_T5_DIM) and pooled.shape[1:] == (TINY_CLIP_DIM,)
  np.testing.assert_allclose(t5[:, 0, 0], -pooled[:, 0], rtol=1e-6)  # t5 was negated in fake_predict
  server_last = 0.01 * np.array([6, 12, 4, 7, 5, 8], np.float32) + SERVER_W  # server images first
  node_rows = 0.01 * np.array([12, 15, 13, 16, 14], np.float32) + CLIENT_W[1]
  np.testing.assert_allclose(pooled[:, 0], np.concatenate([server_last, node_rows]), rtol=1e-6)


def test_render_sd_in_training(tiny):
  cfg = make_cfg(tiny, "sd", generate_nodes_images_frequency=1, render_node=0, images_per_class=1,
                 num_inference_steps=1, guidance_scale=2.0)
  outputs = RoundOutputs(cfg, tiny / "sd_run", CLASSES, CLIP_IDS, "h")
  calls = []
  m = call(outputs, 1, "sd", calls)
  assert {k for k in m if k.startswith("test/")} == {
      f"test/node_0/image_{k}" for k in ("accuracy", "balanced_accuracy", "f1_score")}
  node = tiny / "sd_run" / "images" / "round_001" / "node_0"
  assert _pngs(node) == ["one_clip_4.png", "rail_transport_clip_5.png", "sheet_one.png",
                         "sheet_rail_transport.png", "sheet_zero.png", "zero_clip_6.png"]
  assert len(calls) == 1
  # Heads whose width does not fit the renderer: a clear error, not a garbage image.
  bad = lambda p, idx: {"clip": np.zeros((len(idx), 77, 8), np.float32)}
  with pytest.raises(eio.EmbeddingsFileError, match="width 8"):
    outputs(2, predict_fn=bad, server_params=None, client_params={"w": CLIENT_W},
            node_splits=NODES, labels=LABELS)
