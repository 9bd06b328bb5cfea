"""partition / split / build_nodes: disjoint, complete, seeded, and loud about impossible requests."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from a2v_jax.config import load
from a2v_jax.data.nodes import NodeData, build_nodes
from a2v_jax.data.partition import SPLITS, PartitionError, partition, split
from a2v_jax.data.records import Clip, ClipSet

ROOT = Path(__file__).resolve().parents[1] / "data" / "fsdd"
SCHEMES = ("group", "class", "dirichlet", "iid")


def _toy(num_groups=3, num_classes=4, takes=9, test_takes=3):
  """Every (group, class) pair has ``takes`` clips; takes below ``test_takes`` are official test."""
  clips = tuple(
      Clip(path=f"{c}_{g}_{t}.wav", label=c, group=f"g{g}", clip_id=f"{c}_{g}_{t}",
           split="test" if t < test_takes else "train")
      for c in range(num_classes) for g in range(num_groups) for t in range(takes))
  return ClipSet(name="toy", class_names=tuple("abcdefgh"[:num_classes]), clips=clips)


def _assert_disjoint(parts, total=None):
  joined = np.concatenate(list(parts))
  assert np.unique(joined).size == joined.size
  for p in parts:
    assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
  if total is not None:
    np.testing.assert_array_equal(np.sort(joined), np.arange(total))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_disjoint_complete_deterministic(scheme):
  cs = _toy()
  parts = partition(cs, scheme, 3, seed=7)
  assert len(parts) == 3 and all(p.size for p in parts)
  _assert_disjoint(parts, len(cs))
  again = partition(cs, scheme, 3, seed=7)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_random_schemes_change_with_seed(scheme):
  cs = _toy()
  a, b = partition(cs, scheme, 3, seed=0), partition(cs, scheme, 3, seed=1)
  assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_group_one_node_per_group_and_round_robin():
  cs = _toy(num_groups=5)
  groups = np.array([c.group for c in cs.clips])
  for k, p in enumerate(partition(cs, "group", 5, seed=0)):
    np.testing.assert_array_equal(p, np.flatnonzero(groups == f"g{k}"))
  for k, p in enumerate(partition(cs, "group", 2, seed=0)):
    expected = [f"g{i}" for i in range(5) if i % 2 == k]
    np.testing.assert_array_equal(p, np.flatnonzero(np.isin(groups, expected)))


def test_class_one_class_per_node():
  cs = _toy()
  for k, p in enumerate(partition(cs, "class", 4, seed=0)):
    np.testing.assert_array_equal(p, np.flatnonzero(cs.labels == k))
  for k, p in enumerate(partition(cs, "class", 3, seed=0)):
    np.testing.assert_array_equal(p, np.flatnonzero(cs.labels % 3 == k))


def test_samples_per_node_slices_seeded_subsets():
  cs = _toy()
  full = partition(cs, "class", 4, seed=3)
  cut = partition(cs, "class", 4, seed=3, samples_per_node=10)
  other = partition(cs, "class", 4, seed=4, samples_per_node=10)
  for f, c in zip(full, cut):
    assert c.size == min(10, f.size) and np.all(np.isin(c, f))
  _assert_disjoint(cut)
  assert any(not np.array_equal(x, y) for x, y in zip(cut, other))
  big = partition(cs, "class", 4, seed=3, samples_per_node=10_000)
  assert all(np.array_equal(x, y) for x, y in zip(big, full))


def test_iid_sizes_are_balanced():
  sizes = [p.size for p in partition(_toy(), "iid", 5, seed=0)]
  assert sum(sizes) == 108 and max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_skews_labels():
  cs = _toy(num_groups=10, num_classes=4, takes=10)
  parts = partition(cs, "dirichlet", 4, seed=0, alpha=0.05)
  share = [np.bincount(cs.labels[p], minlength=4).max() / p.size for p in parts]
  # Near one-class nodes; iid nodes would sit near 0.25.
  assert np.mean(share) > 0.6


@pytest.mark.parametrize("scheme, nodes, kwargs, message", [
    ("group", 4, {}, "4 nodes but dataset 'toy' has only 3 groups"),
    ("class", 5, {}, "5 nodes but dataset 'toy' has only 4 classes"),
    ("iid", 200, {}, "200 nodes but dataset 'toy' has only 108 clips"),
    ("iid", 0, {}, "num_nodes must be >= 1"),
    ("iid", 2, {"samples_per_node": 0}, "samples_per_node must be >= 1"),
    ("random", 2, {}, "unknown partition scheme 'random'"),
    ("dirichlet", 2, {"alpha": 0.0}, "alpha must be > 0"),
])
def test_impossible_requests(scheme, nodes, kwargs, message):
  with pytest.raises(PartitionError, match=re.escape(message)):
    partition(_toy(), scheme, nodes, seed=0, **kwargs)


def test_zero_sample_node_is_an_error():
  cs = _toy()
  holey = ClipSet(name="holey", class_names=cs.class_names + ("e",), clips=cs.clips)
  with pytest.raises(PartitionError, match=r"node 4 of 5 gets no clips"):
    partition(holey, "class", 5, seed=0)
  tiny = ClipSet(name="tiny", class_names=("a",), clips=cs.clips[:3])
  with pytest.raises(PartitionError, match="gave every one of 3 nodes a clip"):
    partition(tiny, "dirichlet", 3, seed=0, alpha=1e-3)


def _split(cs, idx, mode, seed=0, **kw):
  args = dict(train_ratio=0.8, val_ratio=0.1, test_ratio=0.1, official_val_fraction=0.1)
  args.update(kw)
  return split(cs, idx, mode, seed=seed, **args)


def _half_up(ratio, n):
  return int(ratio * n + 0.5)


def test_official_split():
  cs = _toy(takes=12, test_takes=2)
  idx = partition(cs, "group", 3, seed=0)[1]
  out = _split(cs, idx, "official", official_val_fraction=0.25)
  _assert_disjoint(out.values())
  np.testing.assert_array_equal(np.sort(np.concatenate(list(out.values()))), idx)
  official = np.array([cs.clips[i].split for i in idx])
  np.testing.assert_array_equal(out["test"], idx[official == "test"])
  train_labels = cs.labels[idx[official == "train"]]
  for c in range(4):
    n = int(np.sum(train_labels == c))
    assert np.sum(cs.labels[out["val"]] == c) == _half_up(0.25, n)
  again = _split(cs, idx, "official", official_val_fraction=0.25)
  other = _split(cs, idx, "official", seed=1, official_val_fraction=0.25)
  assert all(np.array_equal(out[s], again[s]) for s in SPLITS)
  assert not np.array_equal(out["val"], other["val"])


def test_official_val_clips_are_kept():
  cs = _toy()
  clips = tuple(dataclasses.replace(c, split="val") if i % 10 == 0 else c
                for i, c in enumerate(cs.clips))
  cs = ClipSet(name="v", class_names=cs.class_names, clips=clips)
  out = _split(cs, np.arange(len(cs)), "official", official_val_fraction=0.0)
  np.testing.assert_array_equal(out["val"], np.arange(0, len(cs), 10))


def test_stratified_split():
  cs = _toy(takes=13)
  idx = np.arange(len(cs))
  out = _split(cs, idx, "stratified", train_ratio=0.6, val_ratio=0.15, test_ratio=0.25)
  _assert_disjoint(out.values(), len(cs))
  for c in range(4):
    n = int(np.sum(cs.labels == c))
    n_test, n_val = _half_up(0.25, n), _half_up(0.15, n)
    got = [int(np.sum(cs.labels[out[s]] == c)) for s in SPLITS]
    assert got == [n - n_test - n_val, n_val, n_test]
  other = _split(cs, idx, "stratified", seed=5, train_ratio=0.6, val_ratio=0.15, test_ratio=0.25)
  assert not np.array_equal(out["test"], other["test"])


@pytest.mark.parametrize("mode, kw, message", [
    ("stratified", {"train_ratio": 0.5}, "must sum to 1"),
    ("stratified", {"val_ratio": -0.1, "train_ratio": 1.0}, "val_ratio must be in [0, 1]"),
    ("official", {"official_val_fraction": 2.0}, "official_val_fraction must be in [0, 1]"),
    ("random", {}, "unknown split mode 'random'"),
])
def test_split_errors(mode, kw, message):
  cs = _toy()
  with pytest.raises(PartitionError, match=re.escape(message)):
    _split(cs, np.arange(10), mode, **kw)


def test_official_split_needs_official_labels():
  cs = _toy()
  bare = ClipSet(name="bare", class_names=cs.class_names,
                 clips=tuple(Clip(path=c.path, label=c.label, group=c.group, clip_id=c.clip_id)
                             for c in cs.clips))
  with pytest.raises(PartitionError, match="use split 'stratified'"):
    _split(bare, np.arange(5), "official")
  with pytest.raises(PartitionError, match="repeat"):
    _split(cs, np.array([1, 1]), "official")


@pytest.mark.skipif(not (ROOT / "recordings").is_dir(), reason="FSDD not present")
def test_build_nodes_fsdd_by_speaker():
  cfg = load(None, [f"dataset_root={ROOT}"])
  data = build_nodes(cfg)
  assert isinstance(data, NodeData) and data.num_nodes == 5
  cs = data.clipset
  _assert_disjoint([node[s] for node in data.nodes for s in SPLITS], len(cs))
  for node in data.nodes:
    all_idx = np.concatenate([node[s] for s in SPLITS])
    assert len({cs.clips[i].group for i in all_idx}) == 1
    assert all(cs.clips[i].split == "test" for i in node["test"])
  counts = data.counts()
  assert counts.shape == (5, 3, 10) and counts.sum() == len(cs)
  text = data.summary()
  assert "zero" in text and "nine" in text and f"{len(cs)} clips assigned" in text
  row = f"   0  test   {int(counts[0, 2].sum()):>5}"
  assert row in text
