"""read_fsdd indexing, and the dataset registry's dispatch and class selection."""

import dataclasses
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from a2v_jax.config import ConfigError, DataConfig
from a2v_jax.data import registry
from a2v_jax.data.fsdd import read_fsdd
from a2v_jax.data.records import Clip, ClipSet
from a2v_jax.data.registry import DatasetError, read_dataset, select_classes

ROOT = Path(__file__).resolve().parents[1] / "data" / "fsdd"
needs_fsdd = pytest.mark.skipif(not (ROOT / "recordings").is_dir(), reason="FSDD not present")


@needs_fsdd
def test_real_fsdd_index():
  cs = read_fsdd(ROOT)
  stems = sorted(p.stem for p in (ROOT / "recordings").glob("*.wav"))
  assert len(cs) == len(stems) and sorted(c.clip_id for c in cs.clips) == stems
  assert cs.class_names[0] == "zero" and cs.class_names[9] == "nine" and len(cs.class_names) == 10
  for c in cs.clips:
    digit, speaker, take = c.clip_id.split("_")
    assert (c.label, c.group, Path(c.path).stem) == (int(digit), speaker, c.clip_id)
    assert c.split == ("test" if int(take) < 5 else "train")
  keys = [(c.label, c.group, int(c.clip_id.split("_")[2])) for c in cs.clips]
  assert keys == sorted(keys)
  # Same result from the recordings folder itself, and on a second call.
  assert read_fsdd(ROOT / "recordings") == cs == read_fsdd(ROOT)


def _touch(folder, *names):
  folder.mkdir(parents=True, exist_ok=True)
  for n in names:
    (folder / n).write_bytes(b"")


def test_unparseable_names_are_skipped_with_a_warning(tmp_path):
  _touch(tmp_path / "recordings", "3_alice_7.wav", "3_alice_2.wav", "1_bob_10.wav",
         "readme.wav", "x_y_z.wav", "notes.txt")
  with pytest.warns(UserWarning, match=r"skipped 2 \.wav"):
    cs = read_fsdd(tmp_path)
  assert [c.clip_id for c in cs.clips] == ["1_bob_10", "3_alice_2", "3_alice_7"]
  assert [c.split for c in cs.clips] == ["train", "test", "train"]


def test_clean_folder_gives_no_warning(tmp_path):
  _touch(tmp_path, "0_a_0.wav")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert len(read_fsdd(tmp_path)) == 1


@pytest.mark.parametrize("setup, message", [
    ("missing", "not found"), ("empty", "no .wav"), ("only_bad", "no .wav file named")])
def test_bad_roots(tmp_path, setup, message):
  root = tmp_path / "fsdd"
  if setup == "empty":
    root.mkdir()
  elif setup == "only_bad":
    _touch(root, "hello.wav")
  with pytest.raises(DatasetError, match=re.escape(message)) as e, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    read_fsdd(root)
  assert str(root) in str(e.value)


def _toy():
  clips = tuple(Clip(path=f"{i}.wav", label=i % 4, group="g", clip_id=str(i)) for i in range(12))
  return ClipSet(name="toy", class_names=("a", "b", "c", "d"), clips=clips)


def test_select_classes_reindexes_in_given_order():
  cs = _toy()
  sel = select_classes(cs, ("c", "a"))
  assert sel.class_names == ("c", "a")
  kept = [c for c in cs.clips if cs.class_names[c.label] in ("c", "a")]
  assert [c.clip_id for c in sel.clips] == [c.clip_id for c in kept]
  assert [sel.class_names[c.label] for c in sel.clips] == [cs.class_names[c.label] for c in kept]
  assert select_classes(cs, None) is cs


@pytest.mark.parametrize("names, message", [
    (("a", "zz", "yy"), "['zz', 'yy'] not in dataset 'toy'; valid classes are ['a', 'b', 'c', 'd']"),
    (("a", "a"), "repeats ['a']"),
    ((), "is empty"),
])
def test_select_classes_errors(names, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    select_classes(_toy(), names)


def test_unregistered_dataset_lists_registered():
  with pytest.raises(ConfigError, match=r"'folder'.*\['esc50', 'fsdd', 'vegas', 'vggsound'\]"):
    read_dataset(DataConfig(dataset="folder"))


def test_readers_can_be_extended(monkeypatch):
  seen = []
  monkeypatch.setitem(registry.READERS, "folder", lambda root, selected: seen.append(root) or _toy())
  cs = read_dataset(DataConfig(dataset="folder", dataset_root="/x", selected_classes=("d",)))
  assert seen == ["/x"] and cs.class_names == ("d",) and len(cs) == 3
  assert np.all(cs.labels == 0)


@needs_fsdd
def test_read_dataset_fsdd_with_selection():
  cfg = DataConfig(dataset_root=str(ROOT), selected_classes=("nine", "two"))
  cs = read_dataset(cfg)
  full = read_fsdd(ROOT)
  assert len(cs) == int(np.sum(np.isin(full.labels, [9, 2])))
  assert all(c.clip_id.startswith(("9_", "2_")) for c in cs.clips)
  assert all((c.label == 0) == c.clip_id.startswith("9_") for c in cs.clips)
  assert read_dataset(dataclasses.replace(cfg, selected_classes=None)) == full
