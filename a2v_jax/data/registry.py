"""Datasets chosen by name: ``cfg.dataset`` -> a reader -> a ClipSet, then class selection.

Why a registry: the trainer never imports a dataset module; a new dataset is one
reader function (``root -> ClipSet``) added to ``READERS``, and a name with no
reader fails at start-up listing the ones that exist.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from a2v_jax.config import ConfigError, DataConfig
from a2v_jax.data.records import ClipSet, DatasetError  # noqa: F401 (the readers' error, re-exported)

# A reader takes the root folder and the selected class names (None = all); readers that can, skip
# the folders of unselected classes (a partial VEGAS copy), the others read everything.
Reader = Callable[[str, Optional[Sequence[str]]], ClipSet]


def _read_fsdd(root: str, selected: Optional[Sequence[str]] = None) -> ClipSet:
  # Imported on use: a reader pulls in its own dependencies (soundfile, csv parsing) only when read.
  from a2v_jax.data.fsdd import read_fsdd
  return read_fsdd(root)


# Dataset name (``DataConfig.dataset``) -> reader of its root folder. Extend in place.
def _read_vegas(root: str, selected: Optional[Sequence[str]] = None) -> ClipSet:
  from a2v_jax.data.vegas import read_vegas
  return read_vegas(root, selected_classes=selected)


def _read_esc50(root: str, selected: Optional[Sequence[str]] = None) -> ClipSet:
  from a2v_jax.data.esc50 import read_esc50
  return read_esc50(root, selected_classes=selected)


def _read_vggsound(root: str, selected: Optional[Sequence[str]] = None) -> ClipSet:
  from a2v_jax.data.vggsound import read_vggsound
  return read_vggsound(root, selected_classes=selected)


READERS: dict[str, Reader] = {"fsdd": _read_fsdd, "vegas": _read_vegas, "esc50": _read_esc50,
                              "vggsound": _read_vggsound}


def select_classes(clipset: ClipSet, names: Optional[Sequence[str]]) -> ClipSet:
  """Keeps the clips of ``names`` and relabels them 0..len(names)-1 in the given order.

  Args:
    clipset: the full dataset.
    names: class names to keep, in the order that defines the new labels; None keeps all.

  Returns:
    A ClipSet with ``class_names == tuple(names)``, clips in their original order.

  Raises:
    ConfigError: empty selection, repeated names, or names the dataset does not have.
  """
  if names is None:
    return clipset
  names = tuple(names)
  if not names:
    raise ConfigError("config key 'selected_classes' is empty; use null to keep every class")
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ConfigError(f"config key 'selected_classes' repeats {repeated}")
  unknown = [n for n in names if n not in clipset.class_names]
  if unknown:
    raise ConfigError(f"config key 'selected_classes': {unknown} not in dataset '{clipset.name}'; "
                      f"valid classes are {list(clipset.class_names)}")
  new_label = {clipset.class_names.index(n): i for i, n in enumerate(names)}
  clips = tuple(dataclasses.replace(c, label=new_label[c.label])
                for c in clipset.clips if c.label in new_label)
  return ClipSet(name=clipset.name, class_names=names, clips=clips)


def read_dataset(cfg: DataConfig) -> ClipSet:
  """Reads ``cfg.dataset`` from ``cfg.dataset_root`` and applies ``cfg.selected_classes``.

  A relative ``dataset_root`` is resolved against the current directory.

  Raises:
    ConfigError: no reader is registered under ``cfg.dataset``, or a bad class selection.
    DatasetError: the reader cannot read the folder.
  """
  reader = READERS.get(cfg.dataset)
  if reader is None:
    raise ConfigError(f"config key 'dataset': no reader registered for {cfg.dataset!r}; "
                      f"registered datasets are {sorted(READERS)}")
  return select_classes(reader(cfg.dataset_root, cfg.selected_classes), cfg.selected_classes)
