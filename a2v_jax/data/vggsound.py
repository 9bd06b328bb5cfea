"""VGGSound reader: YouTube clips labelled by the official CSV, official train/test split.

Layout::

  {root}/vggsound.csv                     ytid,start,label,split  (no header; '#' = comment)
  {root}/{train|test}/audios/{ytid}_{start}.wav   (start as written or zero-padded, e.g. 000030)

Why a CSV: the reference had no filename -> class metadata and put every clip in the
first class. Here each clip's label comes from its CSV row, and a clip is found by
(YouTube id, start second) whatever the zero-padding of its file name. Many YouTube
videos can no longer be downloaded, so a row whose wav is missing is skipped and
counted in a log warning by default (``on_missing="skip"``); ``"error"`` fails on the
first one, naming the CSV line and the expected path.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal, Optional, Sequence

from a2v_jax.data import scan
from a2v_jax.data.records import Clip, ClipSet

SPLITS = ("train", "test")


def normalize_label(name: str) -> str:
  """Matching key for class names: case, underscores and spacing do not matter."""
  return " ".join(name.lower().replace("_", " ").split())


def _rows(path: Path) -> list[tuple[int, str, int, str, str]]:
  """Rows as (line, ytid, start, label, split); a malformed line names file and line."""
  rows = []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    for fields in reader:
      if not fields or all(not x.strip() for x in fields) or fields[0].lstrip().startswith("#"):
        continue
      where = f"{path}:{reader.line_num}"
      if len(fields) != 4:
        raise scan.DatasetError(
            f"{where}: expected 4 fields (YouTube id, start, label, split), got {len(fields)}: {fields!r}")
      ytid, start, label, split = (x.strip() for x in fields)
      if not ytid or not label:
        raise scan.DatasetError(f"{where}: empty YouTube id or label: {fields!r}")
      if not start.isdigit():
        raise scan.DatasetError(f"{where}: start second must be a non-negative integer, got {start!r}")
      if split not in SPLITS:
        raise scan.DatasetError(f"{where}: split must be one of {list(SPLITS)}, got {split!r}")
      rows.append((reader.line_num, ytid, int(start), label, split))
  if not rows:
    raise scan.DatasetError(f"{path}: no clip rows")
  return rows


def _index_audio(audio_dir: Path) -> dict[tuple[str, int], Path]:
  """Maps (ytid, start) -> wav in one directory listing (no per-row stat)."""
  found = {}
  for p in sorted(audio_dir.iterdir()):
    if p.suffix != ".wav" or "_" not in p.stem:
      continue
    ytid, start = p.stem.rsplit("_", 1)
    if start.isdigit():
      found.setdefault((ytid, int(start)), p)
  return found


def read_vggsound(root: str | Path, *, csv_path: Optional[str | Path] = None,
                  selected_classes: Optional[Sequence[str | int]] = None,
                  on_missing: Literal["skip", "error"] = "skip", durations: bool = True) -> ClipSet:
  """Reads VGGSound clips listed in its CSV into a ClipSet with per-clip labels.

  Args:
    root: folder holding ``train/audios`` and ``test/audios``.
    csv_path: the label CSV; None = ``{root}/vggsound.csv``.
    selected_classes: class names (matched ignoring case, '_' vs ' ') or labels to
      keep; None = all.
    on_missing: a row whose wav is missing is skipped and counted ("skip", default)
      or raises ("error").
    durations: read each clip's duration from its header.

  Returns:
    ClipSet "vggsound": class_names = the CSV's labels, sorted (all of them, whatever
    the selection); clips by label, then clip id; ``group`` = YouTube id; ``split`` =
    the official "train"/"test"; ``clip_id`` = "{ytid}_{start:06d}".

  Raises:
    DatasetError: missing root, CSV or split audio folder; a malformed CSV line or
      one giving another label/split to a clip already listed (file and line); an
      unknown selected class; a missing wav with ``on_missing="error"``.
  """
  if on_missing not in ("skip", "error"):
    raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
  root = scan.require_dir(Path(root), "VGGSound root")
  csv_path = scan.require_file(Path(csv_path) if csv_path else root / "vggsound.csv", "VGGSound CSV")
  rows = _rows(csv_path)
  class_names = tuple(sorted({r[3] for r in rows}))
  index = {n: i for i, n in enumerate(class_names)}
  keep = scan.resolve_classes(selected_classes, class_names, "VGGSound selected_classes",
                              normalize=normalize_label)
  audio = {s: _index_audio(scan.require_dir(root / s / "audios", f"VGGSound {s} audio folder"))
           for s in sorted({r[4] for r in rows})}
  clips: dict[str, Clip] = {}
  first: dict[str, tuple[int, str, str]] = {}
  skipped: list[str] = []
  for line, ytid, start, label, split in rows:
    clip_id = f"{ytid}_{start:06d}"
    if clip_id in first:
      prev_line, prev_label, prev_split = first[clip_id]
      if (prev_label, prev_split) != (label, split):
        raise scan.DatasetError(
            f"{csv_path}:{line}: clip {ytid} at {start}s is listed at line {prev_line} as "
            f"'{prev_label}'/{prev_split}, here as '{label}'/{split}")
      continue
    first[clip_id] = (line, label, split)
    if keep is not None and index[label] not in keep:
      continue
    path = audio[split].get((ytid, start))
    if path is None:
      expected = root / split / "audios" / f"{ytid}_{start}.wav"
      if on_missing == "error":
        raise scan.DatasetError(f"{csv_path}:{line}: missing {expected}")
      skipped.append(f"{csv_path}:{line} ({expected})")
      continue
    clips[clip_id] = Clip(path=str(path), label=index[label], group=ytid, clip_id=clip_id, split=split)
  scan.report_skipped("VGGSound", skipped, "missing wav")
  ordered = sorted(clips.values(), key=lambda c: (c.label, c.clip_id))
  if durations:
    ordered = scan.with_durations(ordered, "VGGSound durations")
  return ClipSet(name="vggsound", class_names=class_names, clips=tuple(ordered))
