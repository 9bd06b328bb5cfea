"""ESC-50 reader: 50 environmental sound classes, 40 clips each, in 5 folds.

Layout (the reference's re-packaged "esc50-v2.0.0-full")::

  {root}/class_labels.json         {"dog": 0, "rooster": 1, ...}  (index = label)
  {root}/fold0{k}.json             {"1-100032-A-0.wav": ["dog"], ...}
  {root}/audio/fold0{k}/*.wav

Why these rules: ESC-50 is a complete, curated set, so a fold entry whose wav is
missing means a broken copy: it is an error by default (``on_missing="error"``,
naming the fold file, its line and the path) rather than the reference's silent skip.
The fold is the natural federated unit (``group``); the folds are cross-validation
folds, not an official train/test split, so ``split`` stays None (the reference also
pooled all folds and split per node).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from a2v_jax.data import scan
from a2v_jax.data.records import Clip, ClipSet

_FOLD_RE = re.compile(r"^fold\d+\.json$")


def _load_json(path: Path) -> tuple[Any, str]:
  text = scan.require_file(path, "ESC-50 metadata file").read_text(encoding="utf-8")
  try:
    return json.loads(text), text
  except json.JSONDecodeError as e:
    raise scan.DatasetError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from e


def _line_of(text: str, key: str) -> int:
  """Line of ``"key"`` in a JSON text (json.load keeps no positions)."""
  pos = text.find(json.dumps(key))
  return text.count("\n", 0, pos) + 1 if pos >= 0 else 0


def _class_names(root: Path) -> tuple[str, ...]:
  path = root / "class_labels.json"
  labels, _ = _load_json(path)
  if not isinstance(labels, dict) or not labels:
    raise scan.DatasetError(f"{path}: expected a non-empty object {{class name: index}}")
  bad = [k for k, v in labels.items() if isinstance(v, bool) or not isinstance(v, int)]
  if bad:
    raise scan.DatasetError(f"{path}: class indices must be integers (see {', '.join(bad[:3])})")
  if sorted(labels.values()) != list(range(len(labels))):
    raise scan.DatasetError(f"{path}: class indices must be 0..{len(labels) - 1}, each used once")
  names = [""] * len(labels)
  for name, i in labels.items():
    names[i] = name
  return tuple(names)


def read_esc50(root: str | Path, *, selected_classes: Optional[Sequence[str | int]] = None,
               on_missing: Literal["skip", "error"] = "error", durations: bool = True) -> ClipSet:
  """Reads an ESC-50 folder tree (reference layout) into a ClipSet.

  Args:
    root: folder holding ``class_labels.json``, ``fold0{k}.json`` and ``audio/``.
    selected_classes: class names or labels to keep; None = all.
    on_missing: a fold entry whose wav is missing raises ("error", default) or is
      skipped and counted in a log warning ("skip").
    durations: read each clip's duration from its header.

  Returns:
    ClipSet "esc50": class_names from ``class_labels.json`` (all classes, whatever
    the selection); clips by fold, then file name; ``group`` = fold ("fold00"...);
    ``clip_id`` = file stem; ``split`` None.

  Raises:
    DatasetError: missing root, metadata file or fold audio folder; invalid JSON
      (file and line); an entry with an unknown class or a malformed value (file,
      line, entry); a file listed twice; an unknown selected class; a missing wav
      with ``on_missing="error"``.
  """
  if on_missing not in ("skip", "error"):
    raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
  root = scan.require_dir(Path(root), "ESC-50 root")
  class_names = _class_names(root)
  index = {n: i for i, n in enumerate(class_names)}
  keep = scan.resolve_classes(selected_classes, class_names, "ESC-50 selected_classes")
  fold_files = sorted(p for p in root.iterdir() if _FOLD_RE.match(p.name))
  if not fold_files:
    raise scan.DatasetError(f"ESC-50: no fold0{{k}}.json files in {root}")
  clips: list[Clip] = []
  skipped: list[str] = []
  seen: dict[str, str] = {}
  for fold_file in fold_files:
    fold = fold_file.stem
    entries, text = _load_json(fold_file)
    if not isinstance(entries, dict):
      raise scan.DatasetError(f"{fold_file}: expected an object {{file name: [class]}}")
    audio_dir = scan.require_dir(root / "audio" / fold, f"ESC-50 audio folder of {fold}")
    present = set(p.name for p in audio_dir.iterdir())
    for filename in sorted(entries):
      where = f"{fold_file}:{_line_of(text, filename)}"
      value = entries[filename]
      name = value[0] if isinstance(value, list) and len(value) == 1 else value
      if not isinstance(name, str):
        raise scan.DatasetError(f"{where}: entry '{filename}' must map to [class name], got {value!r}")
      if name not in index:
        raise scan.DatasetError(f"{where}: entry '{filename}' has unknown class '{name}'"
                                f"{scan.suggest(name, index)}")
      stem = Path(filename).stem
      if stem in seen:
        raise scan.DatasetError(f"{where}: '{filename}' is already listed at {seen[stem]}")
      seen[stem] = where
      if keep is not None and index[name] not in keep:
        continue
      if filename not in present:
        if on_missing == "error":
          raise scan.DatasetError(f"{where}: entry '{filename}': missing {audio_dir / filename}")
        skipped.append(f"{where} ({audio_dir / filename})")
        continue
      clips.append(Clip(path=str(audio_dir / filename), label=index[name], group=fold, clip_id=stem))
  scan.report_skipped("ESC-50", skipped, "missing wav")
  if durations:
    clips = scan.with_durations(clips, "ESC-50 durations")
  return ClipSet(name="esc50", class_names=class_names, clips=tuple(clips))
