"""Reading a local Hugging Face model directory without torch: config.json and safetensors.

Why this module: every frozen backbone (AST, CLIP text, T5, ...) is ported from an HF
directory into a Flax params pytree. The failure modes are the same for all of them (a
wrong path, a ``.bin``-only download, a truncated file, a key renamed between
transformers versions, a config that does not match the weights), so they are reported
here once, with messages that name the directory, file, key and shapes involved.

Tensors are returned as host numpy arrays (conversion to the model's layout happens on
the host, then one ``device_put``). bfloat16 tensors, which numpy cannot name, are read
as ``ml_dtypes.bfloat16``.
"""

from __future__ import annotations

import difflib
import json
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from a2v_jax.errors import A2VError

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype names -> numpy dtypes (little-endian on disk).
_DTYPES: dict[str, Any] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}


class BackboneLoadError(A2VError, ValueError):
  """A local checkpoint directory is missing, incomplete, corrupt or does not match its config."""


class BackboneNotFoundError(BackboneLoadError, FileNotFoundError):
  """The checkpoint directory, or a file it must hold, does not exist."""


def resolve_dir(model_dir: str | Path) -> Path:
  """Returns ``model_dir`` as a Path, or raises if it is not an existing directory.

  Why: ``from_pretrained`` would treat a missing path as a hub id and try the network;
  here a missing path is always an error that says so (weights are never downloaded).
  """
  path = Path(model_dir).expanduser()
  if not path.exists():
    raise BackboneNotFoundError(
        f"model directory not found: {path} (expected a local HF directory with {CONFIG_NAME} "
        f"and {SAFETENSORS_NAME}; hub ids are not downloaded)")
  if not path.is_dir():
    raise BackboneNotFoundError(f"model path is not a directory: {path}")
  return path


def read_config(model_dir: str | Path, name: str = CONFIG_NAME) -> dict[str, Any]:
  """Reads a JSON config (``config.json`` or ``preprocessor_config.json``) from a model directory."""
  path = resolve_dir(model_dir) / name
  if not path.is_file():
    raise BackboneNotFoundError(f"{name} not found in {path.parent}")
  try:
    config = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BackboneLoadError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise BackboneLoadError(f"{path} must hold a JSON object, got {type(config).__name__}")
  return config


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
  """Parses a safetensors header; returns (header, offset of the data section)."""
  size = path.stat().st_size
  with path.open("rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise BackboneLoadError(f"{path} is not a safetensors file: only {size} bytes")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise BackboneLoadError(f"{path} is not a valid safetensors file: header length {n} exceeds "
                            f"file size {size} (truncated or corrupt download?)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BackboneLoadError(f"{path} is not a valid safetensors file: bad header ({e})") from e
  if not isinstance(header, dict):
    raise BackboneLoadError(f"{path} is not a valid safetensors file: header is not an object")
  header.pop("__metadata__", None)
  return header, 8 + n


def read_safetensors_file(path: str | Path) -> dict[str, np.ndarray]:
  """Reads every tensor of one safetensors file into host numpy arrays.

  Why a small reader of our own: ``safetensors.numpy`` refuses bfloat16, which large
  text encoders ship in. The format is an 8-byte header length, a JSON header of
  ``{name: {dtype, shape, data_offsets}}`` and raw little-endian bytes.
  """
  path = Path(path)
  if not path.is_file():
    raise BackboneNotFoundError(f"safetensors file not found: {path}")
  header, start = _read_header(path)
  size = path.stat().st_size
  raw = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
  out: dict[str, np.ndarray] = {}
  for key, info in header.items():
    try:
      dtype = _DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise BackboneLoadError(f"{path}: bad header entry for '{key}': {info!r}") from e
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected or begin < 0 or start + end > size:
      raise BackboneLoadError(
          f"{path}: tensor '{key}' ({info['dtype']}{list(shape)}) needs {expected} bytes at "
          f"[{begin}, {end}) but the file holds {size - start} data bytes (truncated or corrupt?)")
    out[key] = np.array(raw[start + begin:start + end].view(dtype).reshape(shape))
  return out


def read_safetensors(model_dir: str | Path) -> dict[str, np.ndarray]:
  """Reads ``model.safetensors`` (or every shard listed in ``model.safetensors.index.json``)."""
  root = resolve_dir(model_dir)
  single, index = root / SAFETENSORS_NAME, root / SAFETENSORS_INDEX_NAME
  if single.is_file():
    return read_safetensors_file(single)
  if index.is_file():
    try:
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
      raise BackboneLoadError(f"{index} is not a valid safetensors index: {e}") from e
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
      tensors.update(read_safetensors_file(root / shard))
    return tensors
  others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
  hint = (f"; found only {others}: re-save it with save_pretrained(..., safe_serialization=True)"
          if others else "")
  raise BackboneNotFoundError(f"{SAFETENSORS_NAME} not found in {root}{hint}")


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Keeps the tensors whose key starts with ``prefix`` (e.g. a task model's base-model prefix), without it."""
  return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def take(tensors: Mapping[str, np.ndarray], keys: str | Sequence[str], shape: Sequence[int],
         where: str) -> tuple[str, np.ndarray]:
  """Returns (key, tensor) for the first of ``keys`` present, checking its shape.

  Args:
    tensors: name -> array, as read from the checkpoint (prefix already stripped).
    keys: the on-disk name, or several accepted spellings (legacy and renamed), first preferred.
    shape: the shape the config implies.
    where: the checkpoint's location, for the message.

  Returns:
    The key found and its array.

  Raises:
    BackboneLoadError: naming the key, the expected and the found shape, or close key names.
  """
  keys = [keys] if isinstance(keys, str) else list(keys)
  for key in keys:
    if key in tensors:
      value = tensors[key]
      if tuple(value.shape) != tuple(shape):
        raise BackboneLoadError(
            f"{where}: key '{key}' has shape {tuple(value.shape)}, but the config implies "
            f"{tuple(shape)}")
      return key, value
  close = difflib.get_close_matches(keys[0], list(tensors), n=3, cutoff=0.6)
  hint = f" (close keys: {close})" if close else ""
  raise BackboneLoadError(f"{where}: missing key '{keys[0]}'{hint}")


def check_all_used(tensors: Iterable[str], used: Iterable[str], where: str) -> None:
  """Raises if the checkpoint holds weights the config does not account for (e.g. more layers)."""
  extra = sorted(set(tensors) - set(used))
  if extra:
    shown = extra[:5] + (["..."] if len(extra) > 5 else [])
    raise BackboneLoadError(f"{where}: {len(extra)} unexpected keys not described by its config: {shown}")
