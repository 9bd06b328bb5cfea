"""Seeded spreading of a ClipSet over nodes, and of each node over train/val/test.

Why its own module: the reference cut nodes inside each dataset class, differently
per dataset (VEGAS sliced shuffled classes, ESC-50 let nodes share clips), so nodes
could overlap and train clips of one node were test clips of another. Here every
scheme returns disjoint index arrays computed only from labels/groups and a seed,
the same for every dataset, and impossible requests fail with a message saying why.

Everything returns sorted ``int64`` arrays of indices into ``clipset.clips``.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import numpy as np

from a2v_jax.errors import A2VError
from a2v_jax.data.records import ClipSet

Scheme = Literal["group", "class", "dirichlet", "iid"]
SplitMode = Literal["official", "stratified"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
# Dirichlet draws tried before giving up on a partition with every node non-empty.
_DIRICHLET_TRIES = 100


class PartitionError(A2VError, ValueError):
  """An impossible partition or split request; the message says what is impossible."""


def _by_key(keys: np.ndarray, owner: dict, num_nodes: int) -> list[np.ndarray]:
  node_of = np.array([owner[k] for k in keys], np.int64)
  return [np.flatnonzero(node_of == k) for k in range(num_nodes)]


def _group(cs: ClipSet, num_nodes: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
  groups = sorted({c.group for c in cs.clips})
  if num_nodes > len(groups):
    raise PartitionError(f"partition 'group': {num_nodes} nodes but dataset '{cs.name}' has only "
                         f"{len(groups)} groups {groups}")
  # Sorted group i -> node i % num_nodes: node k is group k when the counts match.
  owner = {g: i % num_nodes for i, g in enumerate(groups)}
  return _by_key(np.array([c.group for c in cs.clips], object), owner, num_nodes)


def _class(cs: ClipSet, num_nodes: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
  num_classes = len(cs.class_names)
  if num_nodes > num_classes:
    raise PartitionError(f"partition 'class': {num_nodes} nodes but dataset '{cs.name}' has only "
                         f"{num_classes} classes")
  # Class c -> node c % num_nodes: node k holds class k when the counts match (10n-10c).
  return _by_key(cs.labels, {c: c % num_nodes for c in range(num_classes)}, num_nodes)


def _dirichlet(cs: ClipSet, num_nodes: int, rng: np.random.Generator,
               alpha: float) -> list[np.ndarray]:
  if alpha <= 0:
    raise PartitionError(f"partition 'dirichlet': alpha must be > 0, got {alpha}")
  labels = cs.labels
  for _ in range(_DIRICHLET_TRIES):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
    for c in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == c))
      shares = rng.dirichlet(np.full(num_nodes, alpha))
      cuts = (np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
      for k, piece in enumerate(np.split(idx, cuts)):
        parts[k].append(piece)
    nodes = [np.concatenate(p) for p in parts]
    if all(n.size for n in nodes):
      return nodes
  raise PartitionError(
      f"partition 'dirichlet': no draw in {_DIRICHLET_TRIES} gave every one of {num_nodes} nodes a "
      f"clip (alpha={alpha}, {len(cs)} clips); raise alpha or lower num_nodes")


def _iid(cs: ClipSet, num_nodes: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
  return list(np.array_split(rng.permutation(len(cs)), num_nodes))


_SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {
    "group": _group, "class": _class, "dirichlet": _dirichlet, "iid": _iid}


def partition(
    clipset: ClipSet,
    scheme: Scheme,
    num_nodes: int,
    *,
    seed: int,
    alpha: float = 0.5,
    samples_per_node: Optional[int] = None,
) -> list[np.ndarray]:
  """Assigns every clip to exactly one node.

  Schemes:
    * "group": one node per group (FSDD speaker), groups in sorted order. With fewer
      nodes than groups, sorted group i goes to node ``i % num_nodes`` (round-robin,
      seed unused).
    * "class": one class per node, label k -> node k (the reference's 10n-10c). With
      fewer nodes than classes, class c goes to node ``c % num_nodes``.
    * "dirichlet": label skew; each class is shuffled and cut by Dirichlet(alpha)
      proportions over nodes, redrawn until every node has a clip.
    * "iid": a seeded permutation cut into near-equal parts.

  Then, when ``samples_per_node`` is set, each node keeps the first
  ``samples_per_node`` of a seeded shuffle of its clips (the reference's
  ``node_split_id`` slicing); the dropped clips belong to no node, so completeness
  holds only without it.

  Args:
    clipset: the dataset.
    scheme: one of "group", "class", "dirichlet", "iid".
    num_nodes: nodes to build (>= 1).
    seed: fixes every random choice.
    alpha: Dirichlet concentration (smaller = more skew); "dirichlet" only.
    samples_per_node: cap on clips per node, None = no cap.

  Returns:
    ``num_nodes`` sorted, disjoint, non-empty int64 index arrays.

  Raises:
    PartitionError: unknown scheme, more nodes than groups/classes/clips, a node
      left without clips, or bad numbers.
  """
  if scheme not in _SCHEMES:
    raise PartitionError(f"unknown partition scheme {scheme!r}; choose one of {list(_SCHEMES)}")
  if num_nodes < 1:
    raise PartitionError(f"partition '{scheme}': num_nodes must be >= 1, got {num_nodes}")
  if num_nodes > len(clipset):
    raise PartitionError(f"partition '{scheme}': {num_nodes} nodes but dataset '{clipset.name}' has "
                         f"only {len(clipset)} clips")
  if samples_per_node is not None and samples_per_node < 1:
    raise PartitionError(f"partition '{scheme}': samples_per_node must be >= 1 or None, "
                         f"got {samples_per_node}")
  scheme_rng, slice_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
  nodes = _SCHEMES[scheme](clipset, num_nodes, scheme_rng, alpha)
  if samples_per_node is not None:
    nodes = [slice_rng.permutation(n)[:samples_per_node] for n in nodes]
  for k, n in enumerate(nodes):
    if n.size == 0:
      raise PartitionError(f"partition '{scheme}': node {k} of {num_nodes} gets no clips")
  return [np.sort(n).astype(np.int64) for n in nodes]


def _check_indices(clipset: ClipSet, indices: np.ndarray) -> np.ndarray:
  indices = np.asarray(indices)
  if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
    raise PartitionError(f"split: indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
  indices = indices.astype(np.int64)
  if indices.size and (indices.min() < 0 or indices.max() >= len(clipset)):
    raise PartitionError(f"split: indices must lie in [0, {len(clipset)})")
  if np.unique(indices).size != indices.size:
    raise PartitionError("split: indices repeat a clip")
  return indices


def _count(ratio: float, n: int) -> int:
  """Clips a fraction takes from n: round half up (0.1 of 25 -> 3)."""
  return int(np.floor(ratio * n + 0.5))


def _hold_out(indices: np.ndarray, labels: np.ndarray, fraction: float,
              rng: np.random.Generator) -> np.ndarray:
  """A per-class ``fraction`` of ``indices`` (``_count`` of each class), seeded."""
  held = []
  for c in np.unique(labels[indices]):
    idx = rng.permutation(indices[labels[indices] == c])
    held.append(idx[:_count(fraction, idx.size)])
  return np.concatenate(held) if held else np.zeros(0, np.int64)


def split(
    clipset: ClipSet,
    indices: np.ndarray,
    mode: SplitMode,
    *,
    seed: int,
    train_ratio: float,
    val_ratio: float,
    test_ratio: float,
    official_val_fraction: float,
) -> dict[str, np.ndarray]:
  """Splits one node's clips into train/val/test.

  Modes:
    * "official": ``Clip.split`` decides: "test" clips are test, "val" clips are val,
      and of the "train" clips a per-class ``official_val_fraction`` (rounded half
      up, seeded) is held out as val as well. A clip without an official split is an
      error.
    * "stratified": per class, a seeded shuffle; the first ``round(test_ratio * n)``
      are test, the next ``round(val_ratio * n)`` val (capped by what is left), the
      rest train (so ``train_ratio`` is the remainder and only checked).

  Args:
    clipset: the dataset.
    indices: the node's clip indices.
    mode: "official" or "stratified".
    seed: fixes the shuffles.
    train_ratio, val_ratio, test_ratio: "stratified" fractions, summing to 1.
    official_val_fraction: "official" hold-out fraction of train.

  Returns:
    {"train", "val", "test"} -> sorted, disjoint int64 arrays whose union is ``indices``.

  Raises:
    PartitionError: unknown mode, bad ratios, bad indices, or missing official splits.
  """
  indices = _check_indices(clipset, indices)
  labels = clipset.labels
  rng = np.random.default_rng(seed)
  if mode == "official":
    if not 0.0 <= official_val_fraction <= 1.0:
      raise PartitionError(f"split 'official': official_val_fraction must be in [0, 1], "
                           f"got {official_val_fraction}")
    given = np.array([clipset.clips[i].split for i in indices], object)
    bad = sorted({str(s) for s in given if s not in SPLITS})
    if bad:
      raise PartitionError(f"split 'official': dataset '{clipset.name}' has clips whose official "
                           f"split is {bad} (not one of {list(SPLITS)}); use split 'stratified'")
    train = indices[given == "train"]
    held = _hold_out(train, labels, official_val_fraction, rng)
    out = {"train": np.setdiff1d(train, held), "val": np.concatenate([indices[given == "val"], held]),
           "test": indices[given == "test"]}
  elif mode == "stratified":
    ratios = {"train_ratio": train_ratio, "val_ratio": val_ratio, "test_ratio": test_ratio}
    for key, r in ratios.items():
      if not 0.0 <= r <= 1.0:
        raise PartitionError(f"split 'stratified': {key} must be in [0, 1], got {r}")
    if abs(sum(ratios.values()) - 1.0) > 1e-6:
      raise PartitionError(f"split 'stratified': train/val/test ratios must sum to 1, got "
                           f"{train_ratio} + {val_ratio} + {test_ratio}")
    out = {s: [] for s in SPLITS}
    for c in np.unique(labels[indices]):
      idx = rng.permutation(indices[labels[indices] == c])
      n_test = _count(test_ratio, idx.size)
      n_val = min(_count(val_ratio, idx.size), idx.size - n_test)
      out["test"].append(idx[:n_test])
      out["val"].append(idx[n_test:n_test + n_val])
      out["train"].append(idx[n_test + n_val:])
    out = {s: np.concatenate(v) if v else np.zeros(0, np.int64) for s, v in out.items()}
  else:
    raise PartitionError(f"unknown split mode {mode!r}; choose 'official' or 'stratified'")
  return {s: np.sort(out[s]).astype(np.int64) for s in SPLITS}
