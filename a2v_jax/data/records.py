"""The record stream every dataset reader produces and every partition/cache consumes."""

from __future__ import annotations

import dataclasses
from typing import Optional

from a2v_jax.errors import A2VError


class DatasetError(A2VError, ValueError):
  """A dataset that cannot be read; the message names the folder or file. It lives here, below the readers
  and the registry that dispatches to them, so neither imports the other for it."""


@dataclasses.dataclass(frozen=True)
class Clip:
  """One labelled audio clip.

  Attributes:
    path: path of the audio file.
    label: index into the owning ClipSet's ``class_names``.
    group: the natural federated unit (FSDD speaker, ESC-50 fold, VEGAS video id...).
    clip_id: stable identifier, unique within the dataset (file stem for FSDD).
    split: "train" / "val" / "test" when the dataset defines an official split, else None.
    duration: seconds, when known without decoding (None otherwise).
  """
  path: str
  label: int
  group: str
  clip_id: str
  split: Optional[str] = None
  duration: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class ClipSet:
  """A dataset: its class names (index = label) and its clips in a deterministic order."""
  name: str
  class_names: tuple[str, ...]
  clips: tuple[Clip, ...]

  def __len__(self) -> int:
    return len(self.clips)

  @property
  def labels(self):
    import numpy as np
    return np.asarray([c.label for c in self.clips], dtype=np.int32)
