"""Frozen work done once: AST features and per-class text targets, cached on disk.

Cache keys hash the *content* of the inputs (audio bytes, clip order) and everything that shapes
the output (fbank settings, the backbone's config and weights, token options), so a changed
file or backbone never serves stale features, and an unchanged one never recomputes.
Features are written batch by batch into a memory-mapped ``.npy`` inside a temporary folder
that is renamed into place only when complete: an interrupted extraction leaves nothing that a
later run could mistake for a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from a2v_jax.errors import A2VError
from a2v_jax.config import Config
from a2v_jax.data.records import ClipSet

MAX_LISTED = 20


class FeatureError(A2VError, RuntimeError):
  """Feature extraction failed (bad audio files are listed)."""


class FeatureCacheMiss(FeatureError):
  """``cache_only`` was asked and no cache exists for these clips and settings (``path``: the one looked for)."""

  def __init__(self, message: str, path: Path):
    super().__init__(message)
    self.path = path


def _file_digest(path: Path, h: "hashlib._Hash") -> None:
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)


def dir_digest(path: Path) -> str:
  """Hash of every file in a backbone directory (names + bytes)."""
  h = hashlib.sha256()
  for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
    h.update(str(f.relative_to(path)).encode())
    _file_digest(f, h)
  return h.hexdigest()[:16]


def clips_digest(clipset: ClipSet) -> str:
  """Hash of the clip list and every clip's bytes (missing files are reported by extraction)."""
  h = hashlib.sha256()
  for c in clipset.clips:
    h.update(f"{c.clip_id}|{c.label}\n".encode())
    p = Path(c.path)
    if p.is_file():
      _file_digest(p, h)
    else:
      h.update(b"<missing>")
  return h.hexdigest()[:16]


def pool_tokens(x: np.ndarray, k: Optional[int], special: int = 2) -> np.ndarray:
  """Keeps the ``special`` leading tokens and averages the patch tokens into ``k`` contiguous groups."""
  if k is None or x.shape[1] - special <= k:
    return x
  head, patches = x[:, :special], x[:, special:]
  groups = np.array_split(np.arange(patches.shape[1]), k)
  pooled = np.stack([patches[:, g].mean(axis=1) for g in groups], axis=1)
  return np.concatenate([head, pooled], axis=1)


def _atomic_dir(final: Path) -> Path:
  tmp = final.with_name(final.name + f".tmp{os.getpid()}")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  return tmp


def ast_features(cfg: Config, clipset: ClipSet, *, ast_dir: Optional[Path] = None,
                 verbose: bool = True, cache_only: bool = False,
                 _loader: Optional[Callable] = None) -> np.ndarray:
  """Returns a read-only memmap ``(len(clipset), tokens, hidden)`` of frozen AST features.

  Args:
    cfg: run config (features and backbones sections).
    clipset: the clips, in the order rows are wanted.
    ast_dir: AST directory; default from ``cfg.backbones`` (tiny written on first use).
    verbose: progress bar and timing lines.
    cache_only: read the cache or fail; never construct the AST (Run 2, the design notes: the AST is
      skipped entirely once generators exist). ``ast_dir`` is still hashed for the cache key.
    _loader: test hook replacing ``load_ast``.

  Raises:
    FeatureCacheMiss: ``cache_only`` and no cache for these clips and settings (names the path).
    FeatureError: clips that could not be read or are too long (listed).
  """
  from a2v_jax.backbones.paths import backbone_dir
  from a2v_jax.data.audio import AudioError, load_audio
  from a2v_jax.data.fbank import fbank_batch, num_frames

  fe = cfg.features
  ast_dir = Path(ast_dir) if ast_dir is not None else backbone_dir(cfg, "ast")
  key_src = {"clips": clips_digest(clipset), "ast": dir_digest(ast_dir), "sample_rate": fe.sample_rate,
             "mel": fe.num_mel_bins, "max_length": fe.max_length, "cls": fe.use_cls_token_only,
             "pooled": fe.pooled_tokens, "dtype": fe.cache_dtype, "long": fe.long_clips, "v": 1}
  key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
  final = Path(fe.cache_dir) / f"ast_{clipset.name}_{key}"
  if (final / "manifest.json").is_file():
    if verbose:
      print(f"AST features: cache hit {final}")
    return np.load(final / "features.npy", mmap_mode="r")
  if cache_only:
    raise FeatureCacheMiss(
        f"no AST feature cache {final} for the {len(clipset)} clips of '{clipset.name}' (key {key} over clips, AST "
        f"weights at {ast_dir} and feature settings), and cache_only forbids constructing the AST", final)

  import jax.numpy as jnp
  from a2v_jax.backbones.ast import load_ast, make_ast_encoder
  start = time.time()
  module, params, settings = (_loader or load_ast)(ast_dir, max_length=fe.max_length,
                                                   cls_only=fe.use_cls_token_only)
  encode = make_ast_encoder(module, params)
  n, bs = len(clipset), fe.feature_batch_size
  tmp = _atomic_dir(final)
  out = None
  bad, truncated = [], 0
  bar = tqdm(total=n, desc="AST features", unit="clip", disable=not verbose)
  for lo in range(0, n, bs):
    batch = clipset.clips[lo:lo + bs]
    waves = []
    for c in batch:
      try:
        w = load_audio(c.path, fe.sample_rate)
      except AudioError as e:
        bad.append(str(e))
        w = np.zeros((fe.sample_rate // 10,), np.float32)
      if num_frames(w.size, fe.sample_rate) > fe.max_length:
        if fe.long_clips == "error":
          bad.append(f"{c.path}: {w.size / fe.sample_rate:.2f} s is longer than max_length="
                     f"{fe.max_length} frames ({fe.max_length / 100:.2f} s)")
        truncated += 1
      waves.append(w)
    x = fbank_batch(waves, sample_rate=fe.sample_rate, num_mel_bins=fe.num_mel_bins,
                    max_length=fe.max_length)
    pad = bs - len(batch)  # one compiled shape for the last batch too
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    feats = pool_tokens(np.asarray(encode(jnp.asarray(x)))[:len(batch)], fe.pooled_tokens)
    if out is None:
      out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=fe.cache_dtype,
                                      shape=(n,) + feats.shape[1:])
    out[lo:lo + len(batch)] = feats.astype(fe.cache_dtype)
    bar.update(len(batch))
  bar.close()
  if bad:
    shutil.rmtree(tmp)
    listed = "\n  ".join(bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    raise FeatureError(f"{len(bad)} of {n} clips could not be used:\n  {listed}{more}")
  out.flush()
  del out
  manifest = dict(key_src, key=key, num_clips=n, clip_ids=[c.clip_id for c in clipset.clips],
                  truncated=truncated, seconds=round(time.time() - start, 2))
  (tmp / "manifest.json").write_text(json.dumps(manifest))
  if final.exists():
    shutil.rmtree(final)
  tmp.rename(final)
  if verbose:
    note = f", {truncated} clips truncated to {fe.max_length} frames" if truncated else ""
    print(f"AST features: {n} clips in {time.time() - start:.1f} s -> {final}{note}")
  return np.load(final / "features.npy", mmap_mode="r")


def text_targets(cfg: Config, class_names: Sequence[str], *, verbose: bool = True) -> dict[str, np.ndarray]:
  """Per-class targets {branch: (num_classes, ...)} for ``cfg.heads.diffusion_type``, cached."""
  from a2v_jax.backbones.paths import backbone_dir
  dt = cfg.heads.diffusion_type
  dirs = {b: backbone_dir(cfg, "clip_text" if b == "clip" else "t5") for b in cfg.branches}
  key_src = {"classes": list(class_names), "type": dt, "template": cfg.text.prompt_template,
             "t5_len": cfg.text.t5_max_length, "clip_len": cfg.text.clip_max_length,
             "dirs": {b: dir_digest(d) for b, d in dirs.items()}, "v": 1}
  key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
  path = Path(cfg.features.cache_dir) / f"targets_{dt}_{key}.npz"
  if path.is_file():
    with np.load(path) as z:
      return {b: z[b] for b in cfg.branches}
  from a2v_jax.backbones.text import compute_text_targets
  start = time.time()
  targets = compute_text_targets(list(class_names), dt, clip_dir=dirs.get("clip"), t5_dir=dirs.get("t5"),
                                 template=cfg.text.prompt_template, t5_max_length=cfg.text.t5_max_length,
                                 clip_max_length=cfg.text.clip_max_length)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
  np.savez(tmp, **targets)
  tmp.replace(path)
  if verbose:
    shapes = {b: tuple(v.shape) for b, v in targets.items()}
    print(f"text targets ({dt}): {shapes} in {time.time() - start:.1f} s -> {path}")
  return {b: targets[b] for b in cfg.branches}


def check_targets(targets: Mapping[str, np.ndarray], cfg: Config, num_classes: int) -> None:
  """Targets must exist for every branch of the diffusion type, one row per class."""
  for b in cfg.branches:
    if b not in targets:
      raise ValueError(f"diffusion_type '{cfg.heads.diffusion_type}' needs '{b}' targets; "
                       f"found {sorted(targets)}")
    if targets[b].shape[0] != num_classes:
      raise ValueError(f"'{b}' targets have {targets[b].shape[0]} rows for {num_classes} classes")
  t5 = targets.get("t5")
  if t5 is not None and "t5" in cfg.branches and t5.shape[1] != cfg.heads.t5_latents:
    raise ValueError(f"the t5 targets have {t5.shape[1]} tokens, but the t5 head has 't5_latents' = "
                     f"{cfg.heads.t5_latents} latents (one per T5 token)")
