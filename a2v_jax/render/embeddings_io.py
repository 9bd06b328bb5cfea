"""Embeddings checkpoints: predicted conditioning embeddings saved for offline rendering.

Why: rendering (FLUX/SD) is orders of magnitude slower than training the heads, so a run can
write, per node and round, what its heads predict for each clip and render later, on other
hardware, with other sampler settings (the reference's "embeddings-only mode").

Format (one file per node or server and round, ``embeddings_filename``):

* a ``.safetensors`` file whose tensors are the branches, each with the sample axis first:
  ``"clip"`` (N, d) pooled (FLUX) or (N, 77, d) token sequence (SD), ``"t5"`` (N, L, d_t5);
* its metadata header (safetensors' ``__metadata__``, key ``"a2v_jax"``) holds one JSON object:
  ``{"format": "a2v_jax.embeddings", "version": 1, "node", "round", "diffusion_type",
  "config_hash", "timestamp", "class_names": [N], "sample_ids": [N], "split": str | [N]}``.
  One file, so tensors and metadata can never go out of sync; readable with any safetensors
  reader (``safe_open(path, "np").metadata()``), no pickle anywhere.

Files are written atomically (temporary sibling + fsync + ``os.replace``): a crash leaves the
previous file or none, never a truncated one. ``load_embeddings`` also reads the reference's
``.pt`` files (node and server layouts) with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from a2v_jax.errors import A2VError

FORMAT = "a2v_jax.embeddings"
VERSION = 1
SUFFIX = ".safetensors"
METADATA_KEY = "a2v_jax"
BRANCH_NAMES = ("clip", "t5")
# Number of axes of each branch (sample axis included) per diffusion type.
BRANCH_NDIM: dict[str, dict[str, int]] = {
    "flux": {"clip": 2, "t5": 3},
    "sd": {"clip": 3},
    "cogx": {"t5": 3},
}


class EmbeddingsFileError(A2VError, ValueError):
  """A missing, corrupt or inconsistent embeddings file; the message names the file."""


@dataclasses.dataclass(frozen=True)
class EmbeddingsFile:
  """The content of one embeddings checkpoint, one row per sample.

  Attributes:
    path: where it was read from.
    node: node index, or "server" for the global heads.
    round: federated round that produced it.
    diffusion_type: "flux", "sd" or "cogx".
    config_hash: hash of the run config that produced it ("" when unknown, e.g. reference files).
    class_names: (N,) class name of each sample.
    sample_ids: (N,) unique sample identifiers.
    splits: (N,) split of each sample ("train", "val", "test").
    embeddings: branch name -> array with N rows (see module docstring for shapes).
    timestamp: ISO time of writing ("" when unknown).
    source: "safetensors" (ours) or "reference_pt" (fedgfe's .pt layout).
  """
  path: Path
  node: int | str
  round: int
  diffusion_type: str
  config_hash: str
  class_names: tuple[str, ...]
  sample_ids: tuple[str, ...]
  splits: tuple[str, ...]
  embeddings: Mapping[str, np.ndarray]
  timestamp: str = ""
  source: str = "safetensors"

  def __len__(self) -> int:
    return len(self.sample_ids)

  @property
  def branches(self) -> tuple[str, ...]:
    return tuple(self.embeddings)

  @property
  def node_label(self) -> str:
    """"server" or "node_{id}": the prefix of file and image names."""
    return "server" if self.node == "server" else f"node_{self.node}"

  @property
  def classes(self) -> tuple[str, ...]:
    """Distinct class names in order of first appearance."""
    return tuple(dict.fromkeys(self.class_names))


def embeddings_filename(node: int | str, round: int) -> str:
  """``node_{id}_embeddings_r{round}.safetensors`` or ``server_embeddings_r{round}.safetensors``."""
  prefix = "server" if node == "server" else f"node_{node}"
  return f"{prefix}_embeddings_r{int(round)}{SUFFIX}"


def check_branches(embeddings: Mapping[str, Any], diffusion_type: str, *, where: str = "",
                   dims: Optional[Mapping[str, int]] = None) -> None:
  """Checks that the branches fit a diffusion type (and, optionally, a model's widths).

  Args:
    embeddings: branch -> array with the sample axis first.
    diffusion_type: "flux" needs clip (N, d) + t5 (N, L, d_t5); "sd" needs clip (N, 77, d);
      "cogx" needs t5 (N, L, d).
    where: file name for the message.
    dims: optional branch -> expected last-axis width (the renderer's model).

  Raises:
    EmbeddingsFileError: naming the file, the branch and both shapes.
  """
  if diffusion_type not in BRANCH_NDIM:
    raise EmbeddingsFileError(f"{where}: unknown diffusion_type {diffusion_type!r}; "
                              f"choose one of {sorted(BRANCH_NDIM)}")
  need = BRANCH_NDIM[diffusion_type]
  missing = [b for b in need if b not in embeddings]
  if missing:
    raise EmbeddingsFileError(f"{where}: diffusion_type {diffusion_type!r} needs branch(es) "
                              f"{missing}, file has {sorted(embeddings)}")
  for b, ndim in need.items():
    shape = tuple(np.shape(embeddings[b]))
    if len(shape) != ndim:
      want = "(N, d)" if ndim == 2 else "(N, L, d)"
      raise EmbeddingsFileError(f"{where}: branch {b!r} has shape {shape}; diffusion_type "
                                f"{diffusion_type!r} needs {want}")
    if dims and b in dims and shape[-1] != dims[b]:
      raise EmbeddingsFileError(f"{where}: branch {b!r} has width {shape[-1]} (shape {shape}), "
                                f"the {diffusion_type} model expects {dims[b]}")


def _node_value(node: int | str) -> int | str:
  if isinstance(node, (int, np.integer)) and not isinstance(node, bool):
    return int(node)
  if isinstance(node, str):
    return int(node) if node.isdigit() else node
  raise TypeError(f"node must be an int or 'server', got {node!r}")


def save_embeddings(path_without_ext: str | Path, *, embeddings: Mapping[str, Any],
                    class_names: Sequence[str], sample_ids: Sequence[str], node: int | str,
                    round: int, split: Sequence[str] | str, diffusion_type: str,
                    config_hash: str) -> Path:
  """Writes one embeddings checkpoint atomically; returns the ``.safetensors`` path.

  Args:
    path_without_ext: target path; ``.safetensors`` is appended (an existing ``.safetensors``
      suffix is kept). Usually ``dir / embeddings_filename(node, round)``.
    embeddings: branch ("clip", "t5") -> (N, ...) array (numpy or jax), float dtype.
    class_names: (N,) class name per sample.
    sample_ids: (N,) unique id per sample (used in image file names).
    node: node index or "server".
    round: federated round.
    split: one split name for all samples, or (N,) names.
    diffusion_type: "flux" / "sd" / "cogx"; the branches must fit it (``check_branches``).
    config_hash: ``Config.hash()`` of the producing run.

  Returns:
    The written file's path.
  """
  path = Path(path_without_ext)
  if path.suffix != SUFFIX:
    path = path.with_name(path.name + SUFFIX)
  where = str(path)
  tensors = {}
  for b, x in embeddings.items():
    if b not in BRANCH_NAMES:
      raise EmbeddingsFileError(f"{where}: unknown branch {b!r}; choose from {BRANCH_NAMES}")
    arr = np.ascontiguousarray(np.asarray(x))
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
      raise EmbeddingsFileError(f"{where}: branch {b!r} has dtype {arr.dtype}, expected floats")
    tensors[b] = arr
  if not tensors:
    raise EmbeddingsFileError(f"{where}: no embeddings to save")
  n = len(sample_ids)
  for b, arr in tensors.items():
    if arr.ndim < 2 or arr.shape[0] != n:
      raise EmbeddingsFileError(f"{where}: branch {b!r} has shape {arr.shape}, expected {n} rows "
                                f"(one per sample id)")
  if len(class_names) != n:
    raise EmbeddingsFileError(f"{where}: {len(class_names)} class names for {n} samples")
  if len(set(sample_ids)) != n:
    raise EmbeddingsFileError(f"{where}: sample ids are not unique")
  if not isinstance(split, str) and len(split) != n:
    raise EmbeddingsFileError(f"{where}: {len(split)} split names for {n} samples")
  check_branches(tensors, diffusion_type, where=where)
  meta = {
      "format": FORMAT, "version": VERSION, "node": _node_value(node), "round": int(round),
      "diffusion_type": diffusion_type, "config_hash": str(config_hash),
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "class_names": [str(c) for c in class_names], "sample_ids": [str(s) for s in sample_ids],
      "split": split if isinstance(split, str) else [str(s) for s in split],
  }
  from safetensors.numpy import save
  blob = save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def load_embeddings(path: str | Path) -> EmbeddingsFile:
  """Reads an embeddings checkpoint: ours (``.safetensors``) or the reference's (``.pt``).

  Args:
    path: the file.

  Returns:
    An EmbeddingsFile.

  Raises:
    EmbeddingsFileError: missing, corrupt, not an embeddings file, or inconsistent; the
      message names the file.
  """
  path = Path(path)
  if not path.is_file():
    raise EmbeddingsFileError(f"{path}: no such file")
  if path.suffix == ".pt":
    return _load_reference_pt(path)
  if path.suffix != SUFFIX:
    raise EmbeddingsFileError(f"{path}: unknown embeddings file type (expected {SUFFIX} or .pt)")
  from safetensors import safe_open
  try:
    with safe_open(str(path), framework="np") as f:
      header = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise EmbeddingsFileError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from e
  if METADATA_KEY not in header:
    raise EmbeddingsFileError(f"{path}: no '{METADATA_KEY}' metadata: not an a2v_jax embeddings file")
  try:
    meta = json.loads(header[METADATA_KEY])
    if meta.get("format") != FORMAT:
      raise ValueError(f"format {meta.get('format')!r}")
    if meta.get("version") != VERSION:
      raise ValueError(f"unsupported version {meta.get('version')!r} (this code reads {VERSION})")
    n = len(meta["sample_ids"])
    split = meta["split"]
    splits = (split,) * n if isinstance(split, str) else tuple(split)
    ef = EmbeddingsFile(
        path=path, node=_node_value(meta["node"]), round=int(meta["round"]),
        diffusion_type=meta["diffusion_type"], config_hash=meta.get("config_hash", ""),
        class_names=tuple(meta["class_names"]), sample_ids=tuple(meta["sample_ids"]),
        splits=splits, embeddings=tensors, timestamp=meta.get("timestamp", ""), source="safetensors")
  except (KeyError, TypeError, ValueError) as e:
    raise EmbeddingsFileError(f"{path}: bad metadata ({type(e).__name__}: {e})") from e
  _check_rows(ef)
  return ef


def _check_rows(ef: EmbeddingsFile) -> None:
  n = len(ef.sample_ids)
  if len(ef.class_names) != n or len(ef.splits) != n:
    raise EmbeddingsFileError(f"{ef.path}: {n} sample ids, {len(ef.class_names)} class names, "
                              f"{len(ef.splits)} splits")
  if not ef.embeddings:
    raise EmbeddingsFileError(f"{ef.path}: holds no embeddings")
  for b, x in ef.embeddings.items():
    if x.ndim < 2 or x.shape[0] != n:
      raise EmbeddingsFileError(f"{ef.path}: branch {b!r} has shape {x.shape}, expected {n} rows")


# --- the reference's .pt layout (fedgfe clientA2V / serverA2V) ---------------------------


def _to_numpy(x: Any, where: str) -> np.ndarray:
  import torch
  if not isinstance(x, torch.Tensor):
    raise EmbeddingsFileError(f"{where}: expected a tensor, got {type(x).__name__}")
  x = x.detach().cpu()
  if x.dtype == torch.bfloat16:
    x = x.float()
  return x.numpy()


def _squeeze_lead(x: np.ndarray) -> np.ndarray:
  """Per-clip tensors were saved with or without a leading batch axis of 1."""
  return x[0] if x.ndim >= 2 and x.shape[0] == 1 else x


def _stack(rows: list[np.ndarray], where: str, what: str) -> np.ndarray:
  shapes = {r.shape for r in rows}
  if len(shapes) != 1:
    raise EmbeddingsFileError(f"{where}: {what} shapes differ between samples: {sorted(shapes)}")
  return np.stack(rows)


def _load_reference_pt(path: Path) -> EmbeddingsFile:
  import pickle
  import torch
  where = str(path)
  try:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise EmbeddingsFileError(f"{where}: refused to load: it holds objects that "
                              f"torch.load(weights_only=True) will not unpickle ({e})") from e
  except Exception as e:
    raise EmbeddingsFileError(f"{where}: cannot read .pt ({type(e).__name__}: {e})") from e
  if not isinstance(ckpt, dict) or not isinstance(ckpt.get("embeddings"), list):
    raise EmbeddingsFileError(f"{where}: not a reference embeddings checkpoint (no 'embeddings' list)")
  entries = ckpt["embeddings"]
  if not entries or not all(isinstance(e, dict) for e in entries):
    raise EmbeddingsFileError(f"{where}: 'embeddings' must be a non-empty list of dicts")
  meta = ckpt.get("metadata") or {}
  node = ckpt.get("node_id", "server")
  diffusion_type = str(meta.get("diffusion_type", "flux"))
  try:
    if "clip" in entries[0] or "t5" in entries[0]:  # server: one entry per (split, class)
      branches: dict[str, list[np.ndarray]] = {}
      classes, ids, splits = [], [], []
      for e in entries:
        n = None
        for b in BRANCH_NAMES:
          if e.get(b) is not None:
            x = _to_numpy(e[b], where)
            if n is not None and x.shape[0] != n:
              raise EmbeddingsFileError(f"{where}: class {e.get('class_name')!r}: branch row counts differ")
            n = x.shape[0]
            branches.setdefault(b, []).append(x)
        split, cls = str(e.get("split", "all")), str(e["class_name"])
        classes += [cls] * n
        splits += [split] * n
        ids += [f"{split}_{cls}_{i}" for i in range(n)]
      emb = {b: np.concatenate(xs) for b, xs in branches.items()}
      node = "server"
    else:  # node: one entry per clip
      rows: dict[str, list[np.ndarray]] = {}
      classes, ids, splits = [], [], []
      for e in entries:
        for b in BRANCH_NAMES:
          if e.get(f"{b}_embedding") is not None:
            rows.setdefault(b, []).append(_squeeze_lead(_to_numpy(e[f"{b}_embedding"], where)))
        split = str(e.get("split", "all"))
        sid = (e.get("sample_metadata") or {}).get("sample_id") or f"{split}_{e.get('index', len(ids))}"
        classes.append(str(e["class_name"]))
        splits.append(split)
        ids.append(str(sid))
      for b, xs in rows.items():
        if len(xs) != len(ids):
          raise EmbeddingsFileError(f"{where}: branch {b!r} present in {len(xs)} of {len(ids)} entries")
      emb = {b: _stack(xs, where, b) for b, xs in rows.items()}
  except KeyError as e:
    raise EmbeddingsFileError(f"{where}: entry without {e}") from e
  if len(set(ids)) != len(ids):
    raise EmbeddingsFileError(f"{where}: sample ids are not unique")
  ef = EmbeddingsFile(
      path=path, node=_node_value(node),
      round=int(ckpt.get("round", 0)), diffusion_type=diffusion_type, config_hash="",
      class_names=tuple(classes), sample_ids=tuple(ids), splits=tuple(splits), embeddings=emb,
      timestamp=str(ckpt.get("timestamp", "")), source="reference_pt")
  _check_rows(ef)
  return ef
