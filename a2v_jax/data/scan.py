"""Helpers shared by the folder-layout readers (VEGAS, ESC-50, VGGSound).

Why its own module: the three readers fail the same way on the same kinds of bad
input (a missing folder, a metadata line that does not parse, an unknown class), and
they probe durations the same way. Keeping the messages in one place keeps them
uniform: every error names the file, and the line or entry when there is one.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import soundfile as sf
import tqdm

from a2v_jax.data.records import Clip
from a2v_jax.data.records import DatasetError  # the readers' one error type

logger = logging.getLogger(__name__)

# Scans with at least this many files show a progress bar.
PROGRESS_MIN_ITEMS = 200


def require_dir(path: Path, what: str) -> Path:
  """Returns ``path`` if it is a directory, else raises a DatasetError naming it."""
  if not path.exists():
    raise DatasetError(f"{what} not found: {path}")
  if not path.is_dir():
    raise DatasetError(f"{what} is not a directory: {path}")
  return path


def require_file(path: Path, what: str) -> Path:
  """Returns ``path`` if it is a regular file, else raises a DatasetError naming it."""
  if not path.is_file():
    raise DatasetError(f"{what} not found: {path}")
  return path


def suggest(name: str, candidates: Iterable[str]) -> str:
  """A " (did you mean 'x'?)" hint, or an empty string."""
  close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
  return f" (did you mean '{close[0]}'?)" if close else ""


def resolve_classes(selected: Optional[Sequence[str | int]], class_names: Sequence[str],
                    where: str, normalize=lambda s: s) -> Optional[frozenset[int]]:
  """Maps a class selection (names or label indices) to a set of labels.

  The reference silently dropped unknown names (a typo selected *every* class);
  here every unknown entry is named in one error.

  Args:
    selected: class names or integer labels; None = no selection.
    class_names: the dataset's classes, index = label.
    where: what the selection belongs to, for the message.
    normalize: applied to names on both sides before matching.

  Returns:
    The selected labels, or None when ``selected`` is None.
  """
  if selected is None:
    return None
  if isinstance(selected, str):
    selected = [selected]
  index = {normalize(n): i for i, n in enumerate(class_names)}
  labels, unknown = set(), []
  for c in selected:
    if isinstance(c, bool) or not isinstance(c, (int, str)):
      unknown.append(repr(c))
    elif isinstance(c, int):
      if 0 <= c < len(class_names):
        labels.add(c)
      else:
        unknown.append(str(c))
    elif normalize(c) in index:
      labels.add(index[normalize(c)])
    else:
      unknown.append(f"'{c}'{suggest(normalize(c), index)}")
  if unknown:
    raise DatasetError(f"{where}: unknown classes {', '.join(unknown)}; "
                       f"known: {', '.join(class_names[:12])}{' ...' if len(class_names) > 12 else ''}")
  return frozenset(labels)


def progress(items: Sequence, desc: str):
  """Wraps a long scan in a tqdm bar (short scans stay quiet)."""
  if len(items) < PROGRESS_MIN_ITEMS:
    return items
  return tqdm.tqdm(items, desc=desc, unit="file", leave=False)


def probe_duration(path: str | os.PathLike) -> float:
  """Duration in seconds from the file header (no decoding).

  Raises:
    DatasetError: the file is not readable as audio (named in the message).
  """
  try:
    info = sf.info(str(path))
  except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
    raise DatasetError(f"audio file {path}: cannot read its header ({e})") from e
  return float(info.frames) / float(info.samplerate) if info.samplerate else 0.0


def with_durations(clips: Sequence[Clip], desc: str) -> list[Clip]:
  """Fills ``duration`` of every clip from its file header (progress bar on long lists)."""
  return [dataclasses.replace(c, duration=probe_duration(c.path)) for c in progress(clips, desc)]


def report_skipped(dataset: str, skipped: list[str], reason: str) -> None:
  """Logs how many metadata entries were skipped, with a few examples."""
  if skipped:
    head = "; ".join(skipped[:3])
    logger.warning("%s: skipped %d entries (%s), e.g. %s", dataset, len(skipped), reason, head)
