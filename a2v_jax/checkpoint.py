"""Round checkpoints of the full federated state (orbax), with config/shape checks on restore.

Why the checks: the reference reloaded whatever file globbed first (spec 6.1). We store, next to
the state, the resolved config and the shape of every leaf; a restore under another config or
with other shapes is refused with the list of what differs, before orbax touches the arrays.
Orbax writes to a temporary folder and renames it, so an interrupted save never leaves a
half-written round that would be picked up later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

# Keys that may differ between a run and its resumption (they do not change the computation).
RESUMABLE_KEYS = {"global_rounds", "description", "checkpoint_frequency", "max_to_keep", "eval_gap",
                  "output_dir", "wandb", "cache_dir", "tiny_dir", "embeddings_save_frequency"}


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used, with the reason."""


def _shapes(tree: Any) -> dict[str, list[int]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): [int(d) for d in np.shape(x)] for p, x in flat}


def _flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k not in ("generator_class_groups",):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """Human-readable differences between two resolved configs, ignoring resumable keys."""
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
      diffs.append(f"{key}: checkpoint {va!r} != config {vb!r}")
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
    meta = {"round": int(round_), "config": config, "shapes": _shapes(state), **(extra or {})}
    self.manager.save(round_, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def restore(self, abstract_state: Any, config: dict, round_: Optional[int] = None) -> tuple[Any, dict]:
    """Restores a round (latest by number when None) after checking config and shapes."""
    step = self.latest_round() if round_ is None else round_
    if step is None:
      raise CheckpointError(f"no checkpoint found under {self.directory}")
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # corrupt or foreign folder
      raise CheckpointError(f"checkpoint round {step} under {self.directory} is unreadable: {e}") from e
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
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
      raise CheckpointError(f"checkpoint round {step} under {self.directory} is corrupt: {e}") from e
    return restored["state"], meta

  def close(self) -> None:
    self.manager.close()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs of a pytree (restore targets)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                     sharding=getattr(x, "sharding", None)), tree)


def write_json_atomic(path: Path, obj: Any) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  tmp.replace(path)
