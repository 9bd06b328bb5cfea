"""VEGAS reader: the reference's main dataset, 10 sound classes with paired frames.

Layout::

  {root}/{class}/video_info.csv          header + one row per clip (YTID, start/end second)
  {root}/{class}/audios/video_{i:05d}.wav   i = data-row index of video_info.csv
  {root}/{class}/img/video_{i:05d}.jpg

Why these rules: the reference numbered clips by the CSV row and used a clip only when
both its wav and its jpg exist, then sliced nodes out of that list after a seeded
shuffle. Reproducing the reference's node slices (``reference_nodes``) therefore
needs exactly the same clip list, so the same rules are kept by default
(``require_image=True``). Rows whose files are missing (failed YouTube downloads)
are skipped and counted in a log line, as the reference did silently; pass
``on_missing="error"`` to fail on the first one instead. Labels are the reference's
fixed indices whatever the class selection (never remapped).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Literal, Optional, Sequence

from a2v_jax.data import scan
from a2v_jax.data.records import Clip, ClipSet

logger = logging.getLogger(__name__)

# The reference's fixed label order (index = label).
VEGAS_CLASSES: tuple[str, ...] = (
    "baby_cry", "chainsaw", "dog", "drum", "fireworks",
    "helicopter", "printer", "rail_transport", "snoring", "water_flowing",
)

_VIDEO_RE = re.compile(r"^video_(\d+)\.wav$")


def _csv_rows(path: Path) -> list[tuple[int, int, dict[str, str]]]:
  """Data rows of a video_info.csv as (row index, line number, fields).

  Blank lines are skipped without taking a row index (as pandas does); a row whose
  field count differs from the header's is an error naming the file and line.
  """
  rows = []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = None
    for fields in reader:
      if not fields or all(not x.strip() for x in fields):
        continue
      if header is None:
        header = [h.strip() for h in fields]
        continue
      if len(fields) != len(header):
        raise scan.DatasetError(
            f"{path}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)}), "
            f"got {len(fields)}: {fields!r}")
      rows.append((len(rows), reader.line_num, dict(zip(header, (x.strip() for x in fields)))))
  if header is None:
    raise scan.DatasetError(f"{path}: empty file (no header line)")
  return rows


def _class_clips(class_dir: Path, name: str, label: int, require_image: bool,
                 on_missing: str, skipped: list[str]) -> list[Clip]:
  audios = scan.require_dir(class_dir / "audios", f"VEGAS audio folder of class '{name}'")
  wavs = set(p.name for p in audios.iterdir())
  jpgs = None
  if require_image:
    img = scan.require_dir(
        class_dir / "img",
        f"VEGAS image folder of class '{name}' (pass require_image=False to use audio only)")
    jpgs = set(p.name for p in img.iterdir())
  info = class_dir / "video_info.csv"
  if info.is_file():
    entries = [(i, f"{info}:{line}", row.get("YTID", "")) for i, line, row in _csv_rows(info)]
  else:
    # No metadata: number clips by their own file names (the reference's fallback
    # numbered them in directory-listing order, which only works for 0..n-1).
    logger.info("VEGAS class '%s': no video_info.csv, listing %s", name, audios)
    idx = sorted(int(m.group(1)) for m in map(_VIDEO_RE.match, wavs) if m)
    entries = [(i, str(audios / f"video_{i:05d}.wav"), "") for i in idx]
  clips = []
  for i, where, ytid in entries:
    vid = f"video_{i:05d}"
    missing = []
    if f"{vid}.wav" not in wavs:
      missing.append(str(audios / f"{vid}.wav"))
    if jpgs is not None and f"{vid}.jpg" not in jpgs:
      missing.append(str(class_dir / "img" / f"{vid}.jpg"))
    if missing:
      if on_missing == "error":
        raise scan.DatasetError(f"{where}: clip {vid} of class '{name}': missing {', '.join(missing)}")
      skipped.append(f"{where} ({', '.join(missing)})")
      continue
    clips.append(Clip(path=str(audios / f"{vid}.wav"), label=label, group=ytid or f"{name}/{vid}",
                      clip_id=f"{name}/{vid}"))
  return clips


def read_vegas(root: str | Path, *, selected_classes: Optional[Sequence[str | int]] = None,
               require_image: bool = True, on_missing: Literal["skip", "error"] = "skip",
               durations: bool = True) -> ClipSet:
  """Reads a VEGAS folder tree into a ClipSet.

  Args:
    root: the VEGAS root holding one folder per class (other folders are ignored).
    selected_classes: class names or labels to read; None = all 10 (every class
      folder must then exist).
    require_image: keep the reference's rule that a clip needs its ``img/*.jpg`` too
      (needed to reproduce its node slices); False = audio alone suffices.
    on_missing: a CSV row whose wav (or jpg) is missing is skipped and counted in a
      log warning ("skip", the reference's behaviour) or raises ("error").
    durations: read each clip's duration from its header (one open per file).

  Returns:
    ClipSet "vegas": class_names = the 10 fixed classes; clips by label, then CSV
    row; ``group`` = the clip's YouTube id (its own id when unknown); ``split`` None
    (VEGAS has no official split); ``clip_id`` = "{class}/video_{i:05d}".

  Raises:
    DatasetError: missing root/class/audios/img folder, unknown class, malformed CSV
      line (file and line named), or a missing file with ``on_missing="error"``.
  """
  if on_missing not in ("skip", "error"):
    raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
  root = scan.require_dir(Path(root), "VEGAS root")
  labels = scan.resolve_classes(selected_classes, VEGAS_CLASSES, "VEGAS selected_classes")
  wanted = sorted(labels) if labels is not None else range(len(VEGAS_CLASSES))
  missing_dirs = [str(root / VEGAS_CLASSES[l]) for l in wanted if not (root / VEGAS_CLASSES[l]).is_dir()]
  if missing_dirs:
    raise scan.DatasetError(
        f"VEGAS class folders not found: {', '.join(missing_dirs)} "
        "(select the classes you have with selected_classes)")
  clips: list[Clip] = []
  skipped: list[str] = []
  for label in wanted:
    name = VEGAS_CLASSES[label]
    clips.extend(_class_clips(root / name, name, label, require_image, on_missing, skipped))
  scan.report_skipped("VEGAS", skipped, "missing wav or jpg")
  if durations:
    clips = scan.with_durations(clips, "VEGAS durations")
  return ClipSet(name="vegas", class_names=VEGAS_CLASSES, clips=tuple(clips))
