"""Free Spoken Digit Dataset (FSDD) -> ClipSet.

Why FSDD: it is small (2,500 clips under 1 s, 8 kHz), ships with the repo, has a
natural federated unit (the speaker) and an official split (takes 0-4 are test),
so every stage can run end to end on a CPU. Files are named
``{digit}_{speaker}_{take}.wav``; nothing is decoded here, so indexing is instant
and a damaged file fails later, in :func:`a2v_jax.data.audio.load_audio`, with its name.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from a2v_jax.data.records import Clip, ClipSet
from a2v_jax.data.records import DatasetError

CLASS_NAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Takes below this number form FSDD's official test split.
TEST_TAKES = 5
_NAME = re.compile(r"^(\d)_([^_]+)_(\d+)$")


def _recordings_dir(root: Path) -> Path:
  """Accepts the dataset folder (with ``recordings/``) or the recordings folder itself."""
  if not root.exists():
    raise DatasetError(f"FSDD root {root}: folder not found")
  if not root.is_dir():
    raise DatasetError(f"FSDD root {root}: not a folder")
  sub = root / "recordings"
  return sub if sub.is_dir() else root


def read_fsdd(root: str | os.PathLike) -> ClipSet:
  """Indexes FSDD recordings without decoding them.

  Each ``{digit}_{speaker}_{take}.wav`` becomes a Clip with label = digit, group =
  speaker, clip_id = file stem, split = "test" for takes 0-4 else "train".
  ``.wav`` files whose names do not parse are skipped; their number (and a few
  names) is reported with ``warnings.warn``, so a stray file never silently
  shifts labels.

  Args:
    root: the dataset folder holding ``recordings/``, or ``recordings/`` itself.

  Returns:
    A ClipSet named "fsdd", clips sorted by (digit, speaker, take).

  Raises:
    DatasetError: the folder is missing or holds no parseable ``.wav`` files.
  """
  folder = _recordings_dir(Path(root))
  wavs = [p for p in folder.iterdir() if p.suffix.lower() == ".wav" and p.is_file()]
  if not wavs:
    raise DatasetError(f"FSDD root {folder}: no .wav files found")
  keyed, skipped = [], []
  for p in wavs:
    m = _NAME.match(p.stem)
    if m is None:
      skipped.append(p.name)
      continue
    digit, speaker, take = int(m.group(1)), m.group(2), int(m.group(3))
    keyed.append(((digit, speaker, take), p))
  if skipped:
    skipped.sort()
    shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    warnings.warn(f"FSDD root {folder}: skipped {len(skipped)} .wav file(s) whose names are not "
                  f"'{{digit}}_{{speaker}}_{{take}}.wav': {shown}", stacklevel=2)
  if not keyed:
    raise DatasetError(f"FSDD root {folder}: no .wav file named '{{digit}}_{{speaker}}_{{take}}.wav'")
  keyed.sort(key=lambda kp: kp[0])
  clips = tuple(
      Clip(path=str(p), label=digit, group=speaker, clip_id=p.stem,
           split="test" if take < TEST_TAKES else "train")
      for (digit, speaker, take), p in keyed)
  return ClipSet(name="fsdd", class_names=CLASS_NAMES, clips=clips)
