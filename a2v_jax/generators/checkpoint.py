"""Generator checkpoints (orbax): one directory per saved round, a JSON manifest, an atomic pointer.

Layout::

  {generator_checkpoint_dir}/{generator_checkpoint_base_name}/
    round_00005/
      manifest.json   what the round holds: round, spec (type, sizes, S, D, classes), slot layout,
                      one entry per slot (node, class/group key, classes, epochs), hashes
      state/          orbax PyTree checkpoint of GenState.arrays(): params, AdamW states, counters,
                      condition table -- every slot of the run, slot axis leading
    round_00010/
    latest            the most recently written round ("round_00010"), replaced atomically after it

Why this shape. The reference wrote one ``.pt`` per (node, class, round) (7.65 GB each), parsed the
names back by regex, and reloaded adapters from the lexicographically *first* file. Here a round is
written under a temporary name and renamed into place, so a directory named ``round_*`` is complete
or absent; rounds are ordered by number, never by name; a restore reads the manifest first and
refuses a checkpoint written for other classes, shapes or generator settings, listing what it
found against what it expected, before touching any array. ``latest`` is a convenience for people
and tools: restores scan the round directories, so a Run 1 interrupted mid-save (a left-over
temporary directory, a damaged later round) resumes from the latest complete round.

Several processes (a multi-process run; the generators are replicated: every process holds the same
state). Process 0 alone writes a round, between two barriers: before it, so no process is still
scanning the directory (``start_run1`` refuses a root that already holds rounds); after it, so every
process finds the round complete when the call returns. Restores read the same files on every process.
Orbax is made process-local (``_checkpointer``): left to its defaults it would make every process join
its saves and restores (barriers, one writer), which neither a save by process 0 alone nor restores
of numpy leaves need.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from a2v_jax import checkpoint as ckpt_lib
from a2v_jax.errors import A2VError
from a2v_jax.config import GeneratorConfig, generator_condition
from a2v_jax.federated import distributed
from a2v_jax.generators.training import GeneratorSpec, GenState, SlotLayout, abstract_arrays

FORMAT = "a2v_jax/generators/v1"
MANIFEST = "manifest.json"
STATE = "state"
LATEST = "latest"
_ROUND_RE = re.compile(r"^round_(\d+)$")
log = logging.getLogger(__name__)
# How long the other processes wait for process 0 to write a round (a generator round is small).
SAVE_TIMEOUT_S = 1800
_saves = 0  # saves so far in this process: every process saves in the same order, so barrier names agree


class GeneratorCheckpointError(A2VError, RuntimeError):
  """A generator checkpoint is missing, partial, corrupt or written for something else."""


def checkpoint_root(cfg: GeneratorConfig) -> Path:
  """``{generator_checkpoint_dir}/{generator_checkpoint_base_name}``."""
  return Path(cfg.generator_checkpoint_dir) / cfg.generator_checkpoint_base_name


def round_dir(cfg: GeneratorConfig, round_num: int) -> Path:
  return checkpoint_root(cfg) / f"round_{round_num:05d}"


def should_save(cfg: GeneratorConfig, round_num: int, last_round: int) -> bool:
  """Save every ``generator_checkpoint_frequency`` rounds and at the last round (when saving is on)."""
  freq = max(1, cfg.generator_checkpoint_frequency)
  return cfg.generator_save_checkpoint and (round_num % freq == 0 or round_num == last_round)


def config_hash(cfg: GeneratorConfig, spec: GeneratorSpec) -> str:
  """Hash of what a restore must agree on: the model fields, the granularity and class groups."""
  blob = json.dumps({"model": spec.model_fields(), "granularity": cfg.generator_granularity,
                     "groups": cfg.generator_class_groups}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _leaf_table(tree: Any) -> dict[str, list]:
  return {jax.tree_util.keystr(p): [list(a.shape), str(np.dtype(a.dtype))]
          for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def _manifest(cfg: GeneratorConfig, state: GenState, round_num: int, extra: Optional[dict]) -> dict:
  spec, layout = state.spec, state.layout
  seen, epoch = np.asarray(state.seen), np.asarray(state.epoch)
  slots = [dict(d, trained_classes=[int(c) for c in np.flatnonzero(seen[d["slot"]])],
                epochs=int(epoch[d["slot"]])) for d in layout.describe()]
  params_per_slot = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(state.params))
  return {
      "format": FORMAT, "round": round_num, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
      "generator_type": spec.generator_type, "conditioned": spec.conditioned,
      "sequence_length": spec.seq_len, "source_length": spec.source_length, "feature_dim": spec.feature_dim,
      "num_classes": spec.num_classes, "class_names": list(layout.class_names) if layout.class_names else None,
      "granularity": layout.granularity, "shared": layout.shared, "num_slots": layout.num_slots,
      "params_per_slot": params_per_slot, "slots": slots,
      "spec": dataclasses.asdict(spec), "layout": dataclasses.asdict(layout),
      "config_hash": config_hash(cfg, spec), "model_hash": spec.model_hash(),
      "generator_config": dataclasses.asdict(cfg), "arrays": _leaf_table(state.arrays()),
      "checksums": ckpt_lib.checksums(jax.device_get(state.arrays())),
      "extra": extra or {},
  }


def _checkpointer() -> ocp.Checkpointer:
  """A synchronous orbax checkpointer: a save has finished when it returns (our own rename then
  publishes the round), and no background thread outlives the call.

  In a multi-process run it involves this process only (orbax skips its barriers for a set of one):
  saves run on process 0 alone and every process restores by itself (see the module docstring).
  """
  if jax.process_count() == 1:
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())
  me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
  return ocp.Checkpointer(ocp.StandardCheckpointHandler(multiprocessing_options=me), multiprocessing_options=me)


def _write_text(path: Path, text: str) -> None:
  """Atomic replace: write a sibling temporary file, fsync, rename over ``path``."""
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def save_generators(cfg: GeneratorConfig, state: GenState, round_num: int, *,
                    extra: Optional[dict] = None) -> Path:
  """Writes round ``round_num`` atomically and points ``latest`` at it.

  Args:
    cfg: generator config (directory, base name; recorded in the manifest).
    state: all generators of the run.
    round_num: the federated round (>= 0).
    extra: JSON-able facts to record (dataset, node split, ...).

  Returns:
    The round directory. An existing directory of the same round is replaced.

  Across processes every process calls this with the same (replicated) state; process 0 writes.
  """
  if jax.process_count() == 1:
    return _save(cfg, state, round_num, extra)
  global _saves
  _saves += 1
  distributed.barrier(f"a2v_generators_save_{_saves}_begin", SAVE_TIMEOUT_S)
  final = _save(cfg, state, round_num, extra) if jax.process_index() == 0 else round_dir(cfg, round_num)
  distributed.barrier(f"a2v_generators_save_{_saves}_end", SAVE_TIMEOUT_S)
  return final


def _save(cfg: GeneratorConfig, state: GenState, round_num: int, extra: Optional[dict]) -> Path:
  """The write itself: orbax into a temporary directory, the manifest, then renames (one writer)."""
  root = checkpoint_root(cfg)
  root.mkdir(parents=True, exist_ok=True)
  final = round_dir(cfg, round_num)
  tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    with _checkpointer() as ckptr:
      ckptr.save((tmp / STATE).absolute(), args=ocp.args.StandardSave(jax.device_get(state.arrays())))
    _write_text(tmp / MANIFEST, json.dumps(_manifest(cfg, state, round_num, extra), indent=1, default=list))
    if final.exists():  # re-saving a round (e.g. after a resume): swap, then drop the old copy
      old = root / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(final, old)
      os.rename(tmp, final)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _write_text(root / LATEST, final.name + "\n")
  return final


def _read_manifest(path: Path) -> dict:
  """The manifest of a round dir, or GeneratorCheckpointError saying what is wrong with it."""
  if not (path / MANIFEST).is_file():
    raise GeneratorCheckpointError(f"{path}: no {MANIFEST} (partial round directory)")
  try:
    manifest = json.loads((path / MANIFEST).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise GeneratorCheckpointError(f"{path}/{MANIFEST} is corrupt: {e}") from e
  found = manifest.get("format") if isinstance(manifest, dict) else None
  if found != FORMAT:
    raise GeneratorCheckpointError(f"{path}/{MANIFEST}: format is {found!r}, expected {FORMAT!r}")
  if not (path / STATE / "_METADATA").is_file():
    raise GeneratorCheckpointError(f"{path}: no finished orbax checkpoint in {STATE}/ (partial round directory)")
  return manifest


def read_extra(cfg: GeneratorConfig, round_num: int) -> dict:
  """The ``extra`` a round's manifest recorded (Run 1's data, scale, DP guarantee)."""
  return _read_manifest(round_dir(cfg, round_num)).get("extra") or {}


def scan_rounds(cfg: GeneratorConfig) -> tuple[list[int], list[str]]:
  """(complete rounds ascending, one line per partial / corrupt / stray entry) under the root."""
  root = checkpoint_root(cfg)
  complete, problems = [], []
  if not root.is_dir():
    return complete, problems
  for p in sorted(root.iterdir()):
    m = _ROUND_RE.match(p.name)
    if p.name == LATEST:
      continue
    if p.name.startswith("."):
      problems.append(f"{p.name}: left-over temporary entry (an interrupted save), ignored")
    elif m is None or not p.is_dir():
      problems.append(f"{p.name}: not a round directory, ignored")
    else:
      try:
        _read_manifest(p)
        complete.append(int(m.group(1)))
      except GeneratorCheckpointError as e:
        problems.append(str(e))
  return sorted(complete), problems


def latest_round(cfg: GeneratorConfig) -> Optional[int]:
  """Highest complete round (by number), None if there is none."""
  complete, _ = scan_rounds(cfg)
  return complete[-1] if complete else None


def _expectations(cfg: GeneratorConfig, manifest: dict, feature_dim: Optional[int], num_classes: Optional[int],
                  class_names: Optional[Sequence[str]]) -> tuple[GeneratorSpec, list[str]]:
  """The spec a restore builds (training fields from ``cfg``) and every disagreement with the manifest."""
  k = manifest["num_classes"] if num_classes is None else num_classes
  d = manifest["feature_dim"] if feature_dim is None else feature_dim
  spec = GeneratorSpec.from_config(cfg, (manifest["source_length"], d), k, manifest["spec"]["cond_dim"])
  norm = lambda x: json.loads(json.dumps(x))
  old = {"condition": "onehot" if manifest["spec"].get("conditioned") else "none",  # written before the fields
         "class_prior": False, "architecture": "token"}
  found = {**{f: manifest["spec"].get(f, old.get(f)) for f in spec.model_fields()},
           "granularity": manifest["granularity"],
           "generator_class_groups": norm(manifest["generator_config"].get("generator_class_groups"))}
  wanted = {**spec.model_fields(), "granularity": cfg.generator_granularity,
            "generator_class_groups": norm(cfg.generator_class_groups)}
  diffs = [f"{f}: checkpoint has {found[f]!r}, expected {wanted[f]!r}" for f in wanted if found[f] != wanted[f]]
  names = manifest["class_names"]
  if class_names is not None and names is not None and list(class_names) != names:
    diffs.append(f"class_names: checkpoint has {manifest['class_names']}, expected {list(class_names)}")
  return spec, diffs


def _expected_text(cfg: GeneratorConfig, feature_dim: Optional[int], num_classes: Optional[int],
                   class_names: Optional[Sequence[str]]) -> str:
  """What a restore looks for, in words: the layout on disk and the generators this config describes."""
  what = [f"generator_type={cfg.generator_type!r}", f"granularity={cfg.generator_granularity!r}",
          f"condition={generator_condition(cfg) or 'none'!r}",
          f"hidden_dim={cfg.generator_hidden_dim}", f"latent_dim={cfg.generator_latent_dim}",
          f"sequence_length={cfg.generator_training_sequence_length}"]
  if feature_dim is not None:
    what.append(f"feature_dim={feature_dim}")
  if class_names is not None:
    what.append(f"classes={list(class_names)}")
  elif num_classes is not None:
    what.append(f"num_classes={num_classes}")
  return ("round_NNNNN/ directories (each with manifest.json and an orbax state/) and a 'latest' pointer, "
          "written by Run 1 (use_generator=true) under the same generator_checkpoint_dir / "
          f"generator_checkpoint_base_name, holding {', '.join(what)}")


def restore_generators(cfg: GeneratorConfig, *, round_num: Optional[int] = None,
                       feature_dim: Optional[int] = None, num_classes: Optional[int] = None,
                       class_names: Optional[Sequence[str]] = None) -> tuple[GenState, int]:
  """Restores the latest complete round (or ``round_num``) written under the config's root.

  The slot layout (which node / class / group each generator serves) comes from the checkpoint;
  the model settings of ``cfg`` (type, conditioning, sizes, S, granularity, class groups) and the
  given feature dim / classes must agree with it. Training settings (learning rate, epochs, ...)
  are taken from ``cfg``, so a resumed Run 1 trains on with the current ones.

  Args:
    cfg: generator config.
    round_num: a specific round; None = the highest complete one.
    feature_dim: expected D (None: accept the checkpoint's).
    num_classes: expected K (None: accept the checkpoint's).
    class_names: expected class names (checked when both sides have them).

  Returns:
    (state, round).

  Raises:
    GeneratorCheckpointError: with what was found and what was expected.
  """
  root = checkpoint_root(cfg)
  wanted = _expected_text(cfg, feature_dim, num_classes, class_names)
  if not root.is_dir():
    parent = root.parent
    found = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
    raise GeneratorCheckpointError(
        f"no generator checkpoints at {root} (generator_checkpoint_dir={cfg.generator_checkpoint_dir!r}, "
        f"generator_checkpoint_base_name={cfg.generator_checkpoint_base_name!r}); "
        + (f"{parent} holds {found}" if parent.is_dir() else f"{parent} does not exist")
        + f". Expected {wanted}")
  complete, problems = scan_rounds(cfg)
  for p in problems:
    log.warning("generator checkpoints: %s", p)
  if round_num is None:
    if not complete:
      raise GeneratorCheckpointError(
          f"no complete round under {root}; found: "
          + ("; ".join(problems) if problems else "nothing (an empty directory)") + f". Expected {wanted}")
    round_num = complete[-1]
  elif round_num not in complete:
    raise GeneratorCheckpointError(f"round {round_num} is not a complete checkpoint under {root}; complete rounds: "
                                   f"{complete}; problems: {problems or 'none'}")
  path = round_dir(cfg, round_num)
  manifest = _read_manifest(path)
  spec, diffs = _expectations(cfg, manifest, feature_dim, num_classes, class_names)
  if diffs:
    raise GeneratorCheckpointError(f"{path} was written for other generators:\n  " + "\n  ".join(diffs))
  lay = manifest["layout"]
  layout = SlotLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in lay.items()})
  abstract = abstract_arrays(spec, layout)
  wanted, found = _leaf_table(abstract), manifest["arrays"]
  if wanted != found:
    diff = [f"{k}: checkpoint {found.get(k)}, expected {wanted.get(k)}" for k in sorted(set(wanted) | set(found))
            if wanted.get(k) != found.get(k)]
    raise GeneratorCheckpointError(f"{path}: arrays do not match the generators:\n  " + "\n  ".join(diff[:10])
                                   + (f"\n  ... {len(diff) - 10} more" if len(diff) > 10 else ""))
  try:
    with _checkpointer() as ckptr:
      arrays = ckptr.restore((path / STATE).absolute(), args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax / tensorstore raise many types for damaged files
    raise GeneratorCheckpointError(f"{path}/{STATE} could not be read (corrupt checkpoint): "
                                   f"{type(e).__name__}: {str(e)[:400]}") from e
  try:
    ckpt_lib.verify_checksums(arrays, manifest, f"generator checkpoint {path}/{STATE}")
  except ckpt_lib.CheckpointError as e:
    raise GeneratorCheckpointError(str(e)) from e
  return GenState(**arrays, spec=spec, layout=layout), round_num
