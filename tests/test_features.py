"""The frozen-feature cache: computed once, reused without touching the AST, invalidated by content."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from a2v_jax import config, features
from a2v_jax.backbones.ast import load_ast
from a2v_jax.backbones.tiny_ast import write_tiny_ast
from a2v_jax.data.fsdd import read_fsdd
from a2v_jax.data.records import ClipSet

FSDD = Path(__file__).resolve().parents[1] / "data" / "fsdd"


@pytest.fixture(scope="module")
def tiny_ast(tmp_path_factory):
  return write_tiny_ast(tmp_path_factory.mktemp("bb") / "ast")


def _clips(tmp_path, n=6) -> ClipSet:
  full = read_fsdd(FSDD)
  picked = full.clips[::len(full.clips) // n][:n]
  out = []
  for c in picked:
    dst = tmp_path / Path(c.path).name
    shutil.copy(c.path, dst)
    out.append(c.__class__(**{**c.__dict__, "path": str(dst)}))
  return ClipSet("fsdd_sub", full.class_names, tuple(out))


def _cfg(tmp_path):
  return config.load(None, [f'cache_dir="{tmp_path / "cache"}"', "feature_batch_size=4", "max_length=128"])


def test_cache_is_reused_and_matches_direct_encoding(tmp_path, tiny_ast):
  cs = _clips(tmp_path)
  calls = []

  def counting_loader(*a, **k):
    calls.append(1)
    return load_ast(*a, **k)

  cfg = _cfg(tmp_path)
  first = np.array(features.ast_features(cfg, cs, ast_dir=tiny_ast, verbose=False, _loader=counting_loader))
  assert len(calls) == 1 and first.shape == (len(cs), 146, 64)

  def forbidden(*a, **k):
    raise AssertionError("the AST must not run on a cache hit")

  second = features.ast_features(cfg, cs, ast_dir=tiny_ast, verbose=False, _loader=forbidden)
  np.testing.assert_array_equal(first, second)

  # Independent computation of one row.
  from a2v_jax.data.audio import load_audio
  from a2v_jax.data.fbank import fbank
  module, params, _ = load_ast(tiny_ast, max_length=128)
  x = fbank(load_audio(cs.clips[2].path), max_length=128)[None]
  np.testing.assert_allclose(first[2], np.asarray(module.apply({"params": params}, x))[0], atol=1e-5)


def test_changed_audio_invalidates_the_cache(tmp_path, tiny_ast):
  cs = _clips(tmp_path)
  cfg = _cfg(tmp_path)
  features.ast_features(cfg, cs, ast_dir=tiny_ast, verbose=False)
  shutil.copy(cs.clips[1].path, cs.clips[0].path)  # content of clip 0 changes
  calls = []
  features.ast_features(cfg, cs, ast_dir=tiny_ast, verbose=False,
                        _loader=lambda *a, **k: calls.append(1) or load_ast(*a, **k))
  assert calls == [1]
  assert len(list((tmp_path / "cache").glob("ast_*"))) == 2


def test_bad_audio_is_named_and_leaves_no_cache(tmp_path, tiny_ast):
  cs = _clips(tmp_path)
  Path(cs.clips[3].path).write_bytes(b"this is not audio")
  with pytest.raises(features.FeatureError, match=Path(cs.clips[3].path).name):
    features.ast_features(_cfg(tmp_path), cs, ast_dir=tiny_ast, verbose=False)
  assert not any((tmp_path / "cache").glob("ast_*/manifest.json"))
  assert not any(p.name.count(".tmp") for p in (tmp_path / "cache").iterdir())


def test_long_clips_error_mode(tmp_path, tiny_ast):
  cs = _clips(tmp_path, n=3)
  cfg = config.load(None, [f'cache_dir="{tmp_path / "cache"}"', "max_length=16", 'long_clips="error"'])
  with pytest.raises(features.FeatureError, match="longer than max_length=16"):
    features.ast_features(cfg, cs, ast_dir=tiny_ast, verbose=False)


def test_pool_tokens_against_numpy():
  x = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)
  out = features.pool_tokens(x, 3)
  assert out.shape == (2, 5, 3)
  np.testing.assert_array_equal(out[:, :2], x[:, :2])
  np.testing.assert_allclose(out[:, 2], x[:, 2:4].mean(1))
  np.testing.assert_allclose(out[:, 4], x[:, 6:8].mean(1))
