"""Flax AST vs torch transformers on tiny random weights written by the project's own writer."""

import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from a2v_jax.backbones import ast, hf
from a2v_jax.backbones.tiny_ast import write_tiny_ast

TOL = 1e-5
B = 2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_ast")
  return {"model": write_tiny_ast(root / "model"),
          "cls": write_tiny_ast(root / "cls", architecture="ASTForAudioClassification"),
          "root": root}


def _fbank(t=128, f=128, seed=0):
  x = np.random.RandomState(seed).randn(B, t, f).astype(np.float32)
  x[1, t // 2:] = 0.0  # a right-padded clip, as the feature extractor makes
  return x


def _torch_hidden(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x)).last_hidden_state.numpy()


def _flax_hidden(model_dir, x, **kw):
  module, params, settings = ast.load_ast(model_dir, **kw)
  return np.asarray(module.apply({"params": params}, x)), params, settings


def test_parity_ast_model(dirs):
  x = _fbank()
  got, _, settings = _flax_hidden(dirs["model"], x)
  want = _torch_hidden(transformers.ASTModel.from_pretrained(dirs["model"], local_files_only=True).eval(), x)
  assert got.shape == want.shape == (B, settings.num_tokens, 64) == (B, 2 + 12 * 12, 64)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_parity_classification_layout(dirs):
  x = _fbank(seed=1)
  got, params, _ = _flax_hidden(dirs["cls"], x)
  tm = transformers.ASTForAudioClassification.from_pretrained(dirs["cls"], local_files_only=True).eval()
  np.testing.assert_allclose(got, _torch_hidden(tm.audio_spectrogram_transformer, x), atol=TOL, rtol=0)
  # Same seed -> the same AST weights as the ASTModel layout; the classifier is ignored.
  _, base_params, _ = ast.load_ast(dirs["model"])
  jax.tree.map(np.testing.assert_array_equal, params, base_params)


def test_cls_only_is_token_zero(dirs):
  x = _fbank(seed=2)
  full, _, _ = _flax_hidden(dirs["model"], x)
  cls, _, _ = _flax_hidden(dirs["model"], x, cls_only=True)
  assert cls.shape == (B, 1, 64)
  np.testing.assert_allclose(cls, full[:, :1], atol=1e-6, rtol=0)


def test_shorter_max_length_crops_time_axis(dirs):
  """max_length 64 keeps the 12 frequency rows and the first 5 of 12 time columns."""
  module, params, settings = ast.load_ast(dirs["model"], max_length=64)
  assert (settings.frequency_patches, settings.time_patches, settings.position_policy) == (12, 5, "crop")
  pos = load_file(dirs["model"] / "model.safetensors")["embeddings.position_embeddings"]
  want_pos = np.concatenate([pos[:, :2], pos[:, 2:].reshape(1, 12, 12, 64)[:, :, :5].reshape(1, 60, 64)], 1)
  np.testing.assert_array_equal(np.asarray(params["embeddings"]["position_embeddings"]), want_pos)

  # Whole model == torch ASTModel built for 64 frames holding the cropped embeddings.
  x = _fbank(t=64, seed=3)
  full = transformers.ASTModel.from_pretrained(dirs["model"], local_files_only=True)
  state = {k: v for k, v in full.state_dict().items()}
  state["embeddings.position_embeddings"] = torch.from_numpy(want_pos)
  short = transformers.ASTModel(transformers.ASTConfig(**{**full.config.to_dict(), "max_length": 64})).eval()
  short.load_state_dict(state)
  got = np.asarray(module.apply({"params": params}, x))
  np.testing.assert_allclose(got, _torch_hidden(short, x), atol=TOL, rtol=0)

  # Exact for the first frames: embeddings equal those of the same clip zero-padded to 128.
  _, params128, s128 = ast.load_ast(dirs["model"])
  emb = lambda s, p, v: np.asarray(ast.ASTEmbeddings(s).apply({"params": p["embeddings"]}, v))
  padded = np.concatenate([x, np.zeros((B, 64, 128), np.float32)], axis=1)
  keep = np.concatenate([[0, 1], 2 + (np.arange(12)[:, None] * 12 + np.arange(5)).ravel()])
  np.testing.assert_allclose(emb(settings, params, x), emb(s128, params128, padded)[:, keep], atol=1e-6)


def test_longer_max_length_interpolates_time_axis(dirs):
  module, params, settings = ast.load_ast(dirs["model"], max_length=192)
  assert (settings.time_patches, settings.position_policy) == (18, "interpolate")
  pos = load_file(dirs["model"] / "model.safetensors")["embeddings.position_embeddings"]
  grid = torch.from_numpy(pos[0, 2:].reshape(12, 12, 64)).permute(2, 0, 1)[None]
  want = torch.nn.functional.interpolate(grid, size=(12, 18), mode="bilinear", align_corners=False)
  want = want[0].permute(1, 2, 0).reshape(1, 12 * 18, 64).numpy()
  got = np.asarray(params["embeddings"]["position_embeddings"])
  np.testing.assert_array_equal(got[:, :2], pos[:, :2])
  np.testing.assert_allclose(got[:, 2:], want, atol=1e-7)
  y = module.apply({"params": params}, _fbank(t=192))
  assert y.shape == (B, 2 + 12 * 18, 64) and np.isfinite(np.asarray(y)).all()


def test_encoder_compiles_once_per_shape(dirs):
  module, params, _ = ast.load_ast(dirs["model"])
  encode = ast.make_ast_encoder(module, params)
  x = _fbank(seed=4)
  a = encode(x)
  b = encode(x + 1.0)
  assert encode.jitted._cache_size() == 1
  np.testing.assert_allclose(np.asarray(a), np.asarray(module.apply({"params": params}, x)), atol=1e-6)
  assert not np.allclose(np.asarray(a), np.asarray(b))
  encode(x[:1])
  assert encode.jitted._cache_size() == 2
  with pytest.raises(ValueError, match=r"\(batch, 128, 128\).*\(2, 100, 128\)"):
    encode(x[:, :100])


def test_real_checkpoint_layout_matches_torch_shapes():
  """The MIT/ast-finetuned-audioset-10-10-0.4593 config: every weight and shape, without weights."""
  mit = {"model_type": "audio-spectrogram-transformer", "architectures": ["ASTForAudioClassification"],
         "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
         "hidden_act": "gelu", "layer_norm_eps": 1e-12, "patch_size": 16, "qkv_bias": True,
         "frequency_stride": 10, "time_stride": 10, "max_length": 1024, "num_mel_bins": 128}
  settings = ast.ASTSettings.from_hf_config(mit)
  with torch.device("meta"):
    meta = transformers.ASTModel(transformers.ASTConfig(**{k: v for k, v in mit.items()
                                                          if k not in ("model_type", "architectures")}))
  torch_shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
  layout = ast._layout(settings)
  assert len(layout) == len(torch_shapes)
  for _, keys, shape in layout:  # keys = (on-disk name, transformers-5 in-memory name)
    assert torch_shapes[keys[-1]] == shape, keys
  out = jax.eval_shape(lambda x: ast.ASTModule(settings).init_with_output(jax.random.key(0), x)[0],
                       jax.ShapeDtypeStruct((1, 1024, 128), np.float32))
  assert out.shape == (1, 1214, 768)


def test_missing_dir_and_files(dirs, tmp_path):
  with pytest.raises(hf.BackboneNotFoundError, match="model directory not found: .*nowhere"):
    ast.load_ast(tmp_path / "nowhere")
  with pytest.raises(hf.BackboneNotFoundError, match="config.json not found"):
    ast.load_ast(tmp_path)
  (tmp_path / "config.json").write_bytes((dirs["model"] / "config.json").read_bytes())
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(hf.BackboneNotFoundError, match=r"model.safetensors not found.*pytorch_model.bin"):
    ast.load_ast(tmp_path)


def _copy_with(dirs, tmp_path, tensors=None, raw=None):
  (tmp_path / "config.json").write_bytes((dirs["model"] / "config.json").read_bytes())
  if raw is not None:
    (tmp_path / "model.safetensors").write_bytes(raw)
  else:
    save_file(tensors, str(tmp_path / "model.safetensors"))
  return tmp_path


def test_corrupt_safetensors(dirs, tmp_path):
  good = (dirs["model"] / "model.safetensors").read_bytes()
  with pytest.raises(hf.BackboneLoadError, match="not a valid safetensors file"):
    ast.load_ast(_copy_with(dirs, tmp_path, raw=b"this is not a safetensors file"))
  with pytest.raises(hf.BackboneLoadError, match="truncated or corrupt"):
    ast.load_ast(_copy_with(dirs, tmp_path, raw=good[: len(good) // 2]))


def test_wrong_shaped_and_missing_keys(dirs, tmp_path):
  tensors = load_file(dirs["model"] / "model.safetensors")
  key = "encoder.layer.1.intermediate.dense.weight"
  bad = {**tensors, key: np.zeros((64, 64), np.float32)}
  with pytest.raises(hf.BackboneLoadError, match=rf"key '{key}' has shape \(64, 64\).*\(128, 64\)"):
    ast.load_ast(_copy_with(dirs, tmp_path, bad))
  missing = {k: v for k, v in tensors.items() if k != "layernorm.bias"}
  with pytest.raises(hf.BackboneLoadError, match="missing key 'layernorm.bias'"):
    ast.load_ast(_copy_with(dirs, tmp_path, missing))
  extra = {**tensors, "encoder.layer.2.output.dense.bias": np.zeros(64, np.float32)}
  with pytest.raises(hf.BackboneLoadError, match=r"1 unexpected keys.*encoder.layer.2"):
    ast.load_ast(_copy_with(dirs, tmp_path, extra))


def test_tiny_writer_is_deterministic_and_idempotent(dirs):
  first = dirs["model"] / "model.safetensors"
  again = write_tiny_ast(dirs["root"] / "again")
  assert (again / "model.safetensors").read_bytes() == first.read_bytes()
  assert (again / "config.json").read_bytes() == (dirs["model"] / "config.json").read_bytes()
  assert hf.read_config(again, "preprocessor_config.json")["max_length"] == 128
  mtime = first.stat().st_mtime_ns
  assert write_tiny_ast(dirs["model"]) == dirs["model"] and first.stat().st_mtime_ns == mtime
  with pytest.raises(hf.BackboneLoadError, match=r"different tiny AST.*max_length"):
    write_tiny_ast(dirs["model"], max_length=64)
  assert not [p for p in os.listdir(dirs["root"]) if ".tmp-" in p]
