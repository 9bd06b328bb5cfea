"""Round checkpoints of the full federated state (orbax), with config/shape checks on restore.

Why the checks: the reference reloaded whatever file globbed first. We store, next to
the state, the resolved config and the shape of every leaf; a restore under another config or
with other shapes is refused with the list of what differs, before orbax touches the arrays.
Orbax writes to a temporary folder and renames it, so an interrupted save never leaves a
half-written round that would be picked up later. What the rename cannot catch -- bits flipped or bytes
lost on disk afterwards, which orbax and TensorStore restore without a word -- the per-array checksums in the
round's metadata do: every restore (resume, evaluate, generate) recomputes them.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from a2v_jax.errors import A2VError

# Keys that may differ between a run and its resumption (they do not change the computation).
RESUMABLE_KEYS = {"global_rounds", "description", "checkpoint_frequency", "max_to_keep", "eval_gap",
                  "output_dir", "wandb", "cache_dir", "tiny_dir", "embeddings_save_frequency"}


class CheckpointError(A2VError, RuntimeError):
  """A checkpoint that cannot be used, with the reason."""


class CorruptCheckpointError(CheckpointError):
  """A round whose files cannot be read or whose arrays differ from what was saved."""


class DiskFullError(CheckpointError):
  """A checkpoint that could not be written for lack of space; the earlier rounds are intact."""


_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "RESOURCE_EXHAUSTED")


def is_disk_full(e: BaseException) -> bool:
  """Whether ``e`` (or what it was raised from) says the disk is full.

  Why the text too: orbax re-raises the OSError of its writer threads, but tensorstore reports ENOSPC as a
  ``ValueError`` whose message starts with its status code, RESOURCE_EXHAUSTED.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(t in str(e) for t in _DISK_FULL_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


class _QuietDiskFull(logging.Filter):
  """Drops orbax's logged tracebacks of a disk-full save: the DiskFullError raised instead says it all."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not ((exc is not None and is_disk_full(exc)) or any(t in record.getMessage() for t in _DISK_FULL_TEXT))


def _shapes(tree: Any) -> dict[str, list[int]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): [int(d) for d in np.shape(x)] for p, x in flat}


def _host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # clients split over processes: a collective
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def checksums(tree: Any) -> dict[str, str]:
  """CRC-32 of every leaf's bytes (with its dtype and shape), by key path ('clients/params/clip/...': the same
  whether the tree is restored into its dataclasses or as plain dicts): recorded at save, recomputed at restore.
  Why CRC-32: it catches every flipped bit and burst of lost bytes at ~1 GB/s on one core."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(_host(x))
    out[jax.tree_util.keystr(path, simple=True, separator='/')] = f"crc32:{zlib.crc32(a.tobytes(), zlib.crc32(f'{a.dtype}{a.shape}'.encode())):08x}"
  return out


def verify_checksums(state: Any, meta: dict, where: str) -> None:
  """Raises CorruptCheckpointError naming the first array of ``state`` whose checksum differs from ``meta``'s.

  Rounds saved before checksums were recorded carry none and are not checked.
  """
  want = meta.get("checksums")
  if not want:
    return
  have = checksums(state)
  bad = [k for k in want if have.get(k) != want[k]]
  if bad:
    raise CorruptCheckpointError(
        f"{where} is corrupt: {len(bad)} array(s) differ from what was saved, first {bad[0]} (checksum "
        f"{have.get(bad[0], 'missing')} != recorded {want[bad[0]]}); its files were changed after the save")


_PATH_IN_ERROR = re.compile(r"(/[^\s'\"]+)")


def unreadable(where: str, e: BaseException) -> CorruptCheckpointError:
  """One line for an orbax / TensorStore failure to read a round, naming the file it reports where it does."""
  text = str(e)
  files = [m for m in _PATH_IN_ERROR.findall(text) if "/" in m[1:]]
  named = f" (file {files[0]})" if files else ""
  return CorruptCheckpointError(f"{where} is corrupt{named}: {_first_line(e)}")


def restore_verified(manager: Any, step: int, where: str) -> tuple[Any, dict]:
  """(state, meta) of round ``step`` of an orbax manager holding ``state`` and ``meta`` items, restored as plain
  dicts (no target tree: evaluate, generate) and checked against the checksums recorded at save.

  Raises:
    CorruptCheckpointError: the round's files cannot be read or its arrays differ from what was saved.
  """
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
  except Exception as e:
    raise unreadable(where, e) from e
  meta = restored["meta"] or {}
  verify_checksums(restored["state"], meta, where)
  return restored["state"], meta


def _flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k not in ("generator_class_groups",):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(saved: dict, current: dict, labels: tuple[str, str] = ("checkpoint", "config")) -> list[str]:
  """Human-readable differences between two resolved configs, ignoring resumable keys; ``labels`` name the two
  sides in each line."""
  a, b = _flat_config(saved), _flat_config(current)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if key.split(".")[-1] in RESUMABLE_KEYS:
      continue
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if isinstance(va, list):
      va = tuple(va)
    if isinstance(vb, list):
      vb = tuple(vb)
    if va != vb:
      diffs.append(f"{key}: {labels[0]} {va!r} != {labels[1]} {vb!r}")
  return diffs


class RoundCheckpointer:
  """Saves/restores ``{"state": pytree, "meta": json}`` per round under ``directory``."""

  def __init__(self, directory: str | Path, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def latest_round(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, round_: int, state: Any, config: dict, extra: Optional[dict] = None) -> None:
    """Writes round ``round_`` (complete, or not at all: orbax renames a finished temporary folder).

    Raises:
      DiskFullError: no space for it; the message names the round, the last complete round kept and
        what to do (free space, ``--resume``). Orbax's own tracebacks of that failure are not logged.
    """
    meta = {"round": int(round_), "config": config, "shapes": _shapes(state), "checksums": checksums(state),
            **(extra or {})}
    kept = self.manager.latest_step()
    _quiet_late_write_callbacks()
    quiet, threads = _QuietDiskFull(), set(threading.enumerate())
    absl_log = logging.getLogger("absl")
    absl_log.addFilter(quiet)
    try:
      self.manager.save(round_, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
      self.manager.wait_until_finished()
    except Exception as e:
      if not is_disk_full(e):
        raise
      _join_new_threads(threads)  # orbax's other writer threads: else they fail (and log) at interpreter exit
      last = (f"the last complete round kept is {kept} ({self.directory / str(kept)})" if kept is not None
              else "no complete round is kept yet (a resumed run starts from round 0)")
      raise DiskFullError(f"disk full while writing the checkpoint of round {round_} under {self.directory} "
                          f"({_first_line(e)}); {last}; free space and run again with --resume") from e
    finally:
      absl_log.removeFilter(quiet)

  def restore(self, abstract_state: Any, config: dict, round_: Optional[int] = None) -> tuple[Any, dict]:
    """Restores a round (latest by number when None) after checking config and shapes, and checks every
    array against the checksum recorded at save.

    Raises:
      CorruptCheckpointError: the round's files cannot be read or its arrays differ from what was saved.
      CheckpointError: another config or other shapes (the round is intact, but not this run's).
    """
    step = self.latest_round() if round_ is None else round_
    if step is None:
      raise CheckpointError(f"no checkpoint found under {self.directory}")
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if not isinstance(meta, dict):
        raise ValueError(f"metadata is a {type(meta).__name__}, not an object")
    except Exception as e:  # corrupt or foreign folder
      raise CorruptCheckpointError(f"checkpoint round {step} under {self.directory} is unreadable "
                                   f"(file {self.directory / str(step) / 'meta'}): {_first_line(e)}") from e
    diffs = config_differences(meta.get("config", {}), config)
    if diffs:
      raise CheckpointError(
          f"checkpoint round {step} under {self.directory} was written with another config:\n  "
          + "\n  ".join(diffs))
    expected, found = _shapes(abstract_state), meta.get("shapes", {})
    shape_diffs = [f"{k}: checkpoint {found.get(k)} != expected {v}"
                   for k, v in expected.items() if found.get(k) != v]
    shape_diffs += [f"{k}: in checkpoint only" for k in found if k not in expected]
    if shape_diffs:
      raise CheckpointError(f"checkpoint round {step} has other shapes:\n  " + "\n  ".join(shape_diffs[:20]))
    where = f"checkpoint round {step} under {self.directory}"
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
      raise unreadable(where, e) from e
    verify_checksums(restored["state"], meta, where)
    return restored["state"], meta

  def restore_intact(self, abstract_state: Any, config: dict, say: Callable[[str], None]
                     ) -> Optional[tuple[Any, dict]]:
    """The newest round that restores intact, or None when no round was ever saved.

    A corrupt round is moved aside (``<run>/state_damaged/<round>``, never deleted) with a line through
    ``say``, and the next older round is tried: a resumed run recomputes the rounds after the one restored.
    Why automatically rather than behind a flag: a preempted job restarted by its scheduler has nobody to
    pass one, and the damaged round is kept for inspection.

    Raises:
      CorruptCheckpointError: every round was damaged (all moved aside; the next --resume starts at round 0).
      CheckpointError: the newest intact round belongs to another config or shapes.
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore(abstract_state, config, step)
      except CorruptCheckpointError as e:
        damaged.append(step)
        if jax.process_index() == 0:  # every process finds the same damage; one moves it
          aside = self.set_aside(step)
          say(f"{e}; moved aside to {aside}; trying the round before")
    if damaged:
      raise CorruptCheckpointError(
          f"no intact checkpoint under {self.directory}: round(s) {damaged} are damaged (moved aside to "
          f"{self.directory.parent / 'state_damaged'}); run again with --resume to start from round 0")
    return None

  def set_aside(self, step: int) -> Path:
    """Moves round ``step`` out of the manager's directory (so a later save of that round does not clash)."""
    dest_root = self.directory.parent / f"{self.directory.name}_damaged"
    dest_root.mkdir(parents=True, exist_ok=True)
    dest, n = dest_root / str(step), 1
    while dest.exists():
      dest, n = dest_root / f"{step}.{n}", n + 1
    shutil.move(str(self.directory / str(step)), str(dest))
    self.manager.reload()
    return dest

  def close(self) -> None:
    self.manager.close()


def _quiet_late_write_callbacks() -> None:
  """Installs (once) an unraisable-hook filter for orbax's failed saves.

  When one write of a save fails (a full disk), orbax closes its event loop while tensorstore's other writes
  are still pending; each then reports "Event loop is closed" through ``sys.unraisablehook`` (about 30
  tracebacks for one round on a 3 MB tmpfs, measured), before the save's own error reaches us. They say
  nothing the DiskFullError does not. Every other unraisable exception is still reported."""
  if getattr(sys.unraisablehook, "_a2v_quiet", False):
    return
  previous = sys.unraisablehook

  def hook(u):
    if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
      previous(u)

  hook._a2v_quiet = True
  sys.unraisablehook = hook


def _join_new_threads(before: set, timeout_s: float = 30.0) -> None:
  deadline = time.monotonic() + timeout_s
  for t in set(threading.enumerate()) - before:
    t.join(max(0.0, deadline - time.monotonic()))


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0][:200] if lines else type(e).__name__


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs of a pytree (restore targets)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                     sharding=getattr(x, "sharding", None)), tree)


def write_json_atomic(path: Path, obj: Any) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  tmp.replace(path)
