"""Embeddings checkpoints: round trip, atomic writes, validation, the reference's .pt layouts."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from a2v_jax.render import embeddings_io as eio


def _flux(n=3, seed=0):
  rs = np.random.RandomState(seed)
  return {"clip": rs.randn(n, 8).astype(np.float32), "t5": rs.randn(n, 5, 6).astype(np.float32)}


def _save(path, **kw):
  args = dict(embeddings=_flux(), class_names=["dog", "cat", "dog"], sample_ids=["a", "b", "c"],
              node=2, round=5, split="val", diffusion_type="flux", config_hash="abc123")
  args.update(kw)
  return eio.save_embeddings(path, **args)


def test_filenames():
  assert eio.embeddings_filename(3, 7) == "node_3_embeddings_r7.safetensors"
  assert eio.embeddings_filename("server", 10) == "server_embeddings_r10.safetensors"


def test_round_trip_flux(tmp_path):
  emb = _flux()
  path = _save(tmp_path / "sub" / "node_2_embeddings_r5", embeddings=emb,
               split=["train", "val", "test"])
  assert path == tmp_path / "sub" / "node_2_embeddings_r5.safetensors"
  assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left behind
  ef = eio.load_embeddings(path)
  assert (ef.node, ef.round, ef.diffusion_type, ef.config_hash) == (2, 5, "flux", "abc123")
  assert ef.class_names == ("dog", "cat", "dog") and ef.sample_ids == ("a", "b", "c")
  assert ef.splits == ("train", "val", "test") and ef.source == "safetensors"
  assert ef.classes == ("dog", "cat") and ef.node_label == "node_2" and len(ef) == 3
  for b in ("clip", "t5"):
    np.testing.assert_array_equal(ef.embeddings[b], emb[b])
  # The metadata is plain JSON in the safetensors header: readable without our code.
  with safe_open(str(path), "np") as f:
    meta = json.loads(f.metadata()[eio.METADATA_KEY])
  assert meta["format"] == eio.FORMAT and meta["split"] == ["train", "val", "test"]


def test_round_trip_sd_server_bf16_and_suffix(tmp_path):
  clip = np.random.RandomState(1).randn(2, 7, 4).astype(ml_dtypes.bfloat16)
  path = eio.save_embeddings(
      tmp_path / eio.embeddings_filename("server", 1), embeddings={"clip": clip},
      class_names=["x", "y"], sample_ids=["0", "1"], node="server", round=1, split="test",
      diffusion_type="sd", config_hash="h")
  assert path.name == "server_embeddings_r1.safetensors"
  ef = eio.load_embeddings(path)
  assert ef.node == "server" and ef.node_label == "server" and ef.splits == ("test", "test")
  assert ef.embeddings["clip"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(ef.embeddings["clip"], clip)


def test_overwrite_is_atomic(tmp_path, monkeypatch):
  path = _save(tmp_path / "f")
  before = path.read_bytes()

  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(eio.os, "replace", boom)
  with pytest.raises(OSError, match="disk full"):
    _save(tmp_path / "f", round=6)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("kw, match", [
    (dict(sample_ids=["a", "b"]), "expected 2 rows"),
    (dict(class_names=["dog"]), "1 class names for 3 samples"),
    (dict(sample_ids=["a", "a", "b"]), "not unique"),
    (dict(split=["train"]), "1 split names"),
    (dict(embeddings={"clip": np.zeros((3, 77, 8), np.float32)}), "needs branch"),
    (dict(embeddings={"clip": np.zeros((3, 1, 8)), "t5": np.zeros((3, 5, 6))}), "needs \\(N, d\\)"),
    (dict(embeddings={"clip": np.zeros((3, 8)), "vae": np.zeros((3, 2))}), "unknown branch"),
    (dict(embeddings={"clip": np.zeros((3, 8), np.int32), "t5": np.zeros((3, 5, 6))}), "dtype"),
    (dict(diffusion_type="sdxl"), "unknown diffusion_type"),
])
def test_save_rejects_inconsistent_input(tmp_path, kw, match):
  with pytest.raises(eio.EmbeddingsFileError, match=match):
    _save(tmp_path / "bad", **kw)
  assert not list(tmp_path.iterdir())


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(eio.EmbeddingsFileError, match="missing.safetensors: no such file"):
    eio.load_embeddings(tmp_path / "missing.safetensors")
  corrupt = tmp_path / "node_0_embeddings_r1.safetensors"
  corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(eio.EmbeddingsFileError, match="node_0_embeddings_r1.safetensors: cannot read"):
    eio.load_embeddings(corrupt)
  truncated = tmp_path / "t.safetensors"
  truncated.write_bytes(_save(tmp_path / "good").read_bytes()[:-10])
  with pytest.raises(eio.EmbeddingsFileError, match="t.safetensors"):
    eio.load_embeddings(truncated)
  from safetensors.numpy import save_file
  foreign = tmp_path / "foreign.safetensors"
  save_file({"clip": np.zeros((2, 3), np.float32)}, str(foreign))
  with pytest.raises(eio.EmbeddingsFileError, match="foreign.safetensors: no 'a2v_jax' metadata"):
    eio.load_embeddings(foreign)
  (tmp_path / "x.npz").write_bytes(b"")
  with pytest.raises(eio.EmbeddingsFileError, match="x.npz: unknown embeddings file type"):
    eio.load_embeddings(tmp_path / "x.npz")


# --- the reference's .pt layouts (spec 6.2) ----------------------------------------------------------


def reference_node_pt(path, n=3, t5=(17, 6), clip=8, batch_axis=False):
  rs = np.random.RandomState(0)
  entries = []
  for i in range(n):
    t = torch.from_numpy(rs.randn(*t5).astype(np.float32))
    c = torch.from_numpy(rs.randn(clip).astype(np.float32))
    if batch_axis:
      t, c = t[None], c[None]
    entries.append({
        "split": "train" if i < 2 else "val", "index": i, "class_name": ["dog", "cat"][i % 2],
        "image_path": f"/x/node_0_train_dog_{i}_r5.png", "image_filename": f"img{i}.png",
        "t5_embedding": t, "clip_embedding": c,
        "sample_metadata": {"sample_id": f"train_{i}", "audio_path": "/a.wav"}})
  torch.save({"node_id": 0, "round": 5, "timestamp": "2026-01-22T12:00:00", "embeddings": entries,
              "metadata": {"diffusion_type": "flux", "selected_classes": ["dog", "cat"]}}, path)
  return entries


@pytest.mark.parametrize("batch_axis", [False, True])
def test_reference_node_pt(tmp_path, batch_axis):
  path = tmp_path / "node_0_embeddings_r5.pt"
  entries = reference_node_pt(path, batch_axis=batch_axis)
  ef = eio.load_embeddings(path)
  assert (ef.node, ef.round, ef.diffusion_type, ef.source) == (0, 5, "flux", "reference_pt")
  assert ef.class_names == ("dog", "cat", "dog") and ef.splits == ("train", "train", "val")
  assert ef.sample_ids == ("train_0", "train_1", "train_2")
  assert ef.embeddings["t5"].shape == (3, 17, 6) and ef.embeddings["clip"].shape == (3, 8)
  np.testing.assert_array_equal(ef.embeddings["t5"][1], entries[1]["t5_embedding"].reshape(17, 6).numpy())
  np.testing.assert_array_equal(ef.embeddings["clip"][2], entries[2]["clip_embedding"].reshape(8).numpy())
  eio.check_branches(ef.embeddings, "flux", dims={"clip": 8, "t5": 6})


def test_reference_server_pt(tmp_path):
  rs = np.random.RandomState(0)
  blocks = [("val", "dog", 2), ("val", "cat", 3)]
  entries = [{"split": s, "class_name": c, "node_id": "server",
              "clip": torch.from_numpy(rs.randn(n, 8).astype(np.float32)),
              "t5": torch.from_numpy(rs.randn(n, 17, 6).astype(np.float32)),
              "audio_embeddings": torch.zeros(n, 4, 3)} for s, c, n in blocks]
  path = tmp_path / "server_embeddings_r3.pt"
  torch.save({"node_id": "server", "round": 3, "timestamp": "t", "embeddings": entries,
              "metadata": {"diffusion_type": "flux", "federation_classes": {"dog": 0, "cat": 1}}}, path)
  ef = eio.load_embeddings(path)
  assert ef.node == "server" and ef.round == 3 and len(ef) == 5
  assert ef.class_names == ("dog",) * 2 + ("cat",) * 3
  assert ef.sample_ids[:3] == ("val_dog_0", "val_dog_1", "val_cat_0")
  np.testing.assert_array_equal(ef.embeddings["clip"][2:], entries[1]["clip"].numpy())
  assert set(ef.embeddings) == {"clip", "t5"}  # audio features are not carried over


class Payload:  # not an allow-listed type: weights_only must refuse it
  def __reduce__(self):
    return (print, ("this must never run",))


def test_reference_pt_never_unpickles_objects(tmp_path, capsys):
  path = tmp_path / "node_1_embeddings_r1.pt"
  torch.save({"embeddings": [Payload()]}, path)
  with pytest.raises(eio.EmbeddingsFileError, match="node_1_embeddings_r1.pt: refused to load"):
    eio.load_embeddings(path)
  assert "must never run" not in capsys.readouterr().out


def test_reference_pt_bad_layouts(tmp_path):
  p = tmp_path / "a.pt"
  torch.save({"foo": 1}, p)
  with pytest.raises(eio.EmbeddingsFileError, match="a.pt: not a reference embeddings"):
    eio.load_embeddings(p)
  entries = reference_node_pt(p)
  entries[1]["t5_embedding"] = torch.zeros(9, 6)
  torch.save({"node_id": 0, "round": 1, "embeddings": entries}, p)
  with pytest.raises(eio.EmbeddingsFileError, match="a.pt: t5 shapes differ"):
    eio.load_embeddings(p)
  p.write_bytes(b"garbage")
  with pytest.raises(eio.EmbeddingsFileError, match="a.pt"):
    eio.load_embeddings(p)


def test_check_branches_reports_widths():
  emb = _flux()
  eio.check_branches(emb, "flux", dims={"clip": 8, "t5": 6})
  with pytest.raises(eio.EmbeddingsFileError, match="'t5' has width 6 .* expects 32"):
    eio.check_branches(emb, "flux", where="f", dims={"clip": 8, "t5": 32})
  with pytest.raises(eio.EmbeddingsFileError,
                     match="'clip' has shape \\(3, 8\\); .*'sd' needs \\(N, L, d\\)"):
    eio.check_branches(emb, "sd", where="f")
