"""The reference's per-node data selection, reproduced clip for clip.

A reference node is a dict of fedgfe node keys (``selected_classes``,
``samples_per_node``, ``node_split_id``, ...). Why reproduce it exactly: the main
reference experiment (10n-10c-400s) gives each node 400 clips of one VEGAS class,
picked as rows ``[k * 400, (k + 1) * 400)`` of that class after a seed-42 shuffle;
comparing against the reference means training on the same clips. The rules, per
node (fedgfe ``VEGASDataset._load_samples_from_disk`` / ``_apply_node_split``):

1. Classes: ``selected_classes`` (names or labels; None = all) minus
   ``excluded_classes``, in label order.
2. ``num_samples_per_class`` (alias ``num_samples``): the first N clips of each class
   in dataset order; ignored when ``samples_per_node`` is set (as in the reference).
3. With ``node_split_id`` and ``samples_per_node`` (or ``num_nodes``): one
   ``np.random.RandomState(node_split_seed)`` per node; for each class in label
   order, its clips sorted by ``clip_id`` are shuffled with it (the state carries
   over from class to class), and the node takes rows
   ``[id * samples_per_node, (id + 1) * samples_per_node)`` of each class, or its even
   share of ``num_nodes`` (remainder to the first ids).

Where the reference was silent, this is strict: unknown classes, a slice past the
end of a class (the reference truncated or dropped it with a log line) and two nodes
sharing clips (the reference's ESC-50 nodes leaked clips this way) are errors. The
train/val/test split of each node's clips is not done here (see ``partition``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from a2v_jax.data import scan
from a2v_jax.data.records import ClipSet

# Node keys this module reads.
DATA_KEYS = frozenset({
    "dataset", "selected_classes", "excluded_classes", "num_samples_per_class", "num_samples",
    "node_split_id", "samples_per_node", "num_nodes", "node_split_seed", "node_id",
})
# Node keys of the reference that do not select clips (split ratios, per-node
# optimiser overrides, ...): accepted and left to ``reference_config``.
OTHER_KEYS = frozenset({
    "train_ratio", "val_ratio", "test_ratio", "use_official_split", "diffusion_type",
    "use_cls_token_only", "adapter_dropout", "clip_adapter_learning_rate",
    "clip_adapter_weight_decay", "t5_adapter_learning_rate", "t5_adapter_weight_decay",
    "generator_granularity", "generator_train_classes", "generator_class_group",
    "dataset_split", "pretext_tasks", "task_type", "balance_classes", "use_folds",
    "train_folds", "test_folds",
})

_DATASET_NAMES = {"vegas": "vegas", "esc50": "esc50", "vggsound": "vggsound"}


def one_class_nodes(class_names: Sequence[str], *, samples_per_node: Optional[int] = 400,
                    node_split_seed: int = 42, dataset: Optional[str] = None) -> list[dict[str, Any]]:
  """The reference's ``{n}n-{n}c-{s}s`` layout: one node per class, slice 0 of each.

  Args:
    class_names: one node per name, in this order.
    samples_per_node: clips per node (400 in the reference); None = all of the class.
    node_split_seed: seed of the per-node shuffle (42 in the reference).
    dataset: optional reference dataset name stored in each node ("VEGAS", ...).

  Returns:
    Node dicts accepted by :func:`reference_node_indices`.
  """
  nodes = []
  for i, name in enumerate(class_names):
    node: dict[str, Any] = {"node_id": str(i), "selected_classes": [name]}
    if samples_per_node is not None:
      node.update(node_split_id=0, samples_per_node=samples_per_node, node_split_seed=node_split_seed)
    if dataset is not None:
      node["dataset"] = dataset
    nodes.append(node)
  return nodes


def _int_key(node: Mapping[str, Any], key: str, where: str, minimum: int) -> Optional[int]:
  value = node.get(key)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise scan.DatasetError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
  return value


def _node_indices(clipset: ClipSet, by_label: dict[int, np.ndarray], node: Mapping[str, Any],
                  where: str) -> np.ndarray:
  unknown = sorted(set(node) - DATA_KEYS - OTHER_KEYS)
  if unknown:
    raise scan.DatasetError(f"{where}: unknown node keys {unknown}")
  ds = node.get("dataset")
  if ds is not None:
    key = str(ds).lower().replace("-", "").replace("_", "")
    if _DATASET_NAMES.get(key, key) != clipset.name:
      raise scan.DatasetError(f"{where}: node dataset '{ds}' is not this dataset ('{clipset.name}')")
  selected = scan.resolve_classes(node.get("selected_classes"), clipset.class_names,
                                  f"{where} selected_classes")
  excluded = scan.resolve_classes(node.get("excluded_classes"), clipset.class_names,
                                  f"{where} excluded_classes") or frozenset()
  labels = [l for l in range(len(clipset.class_names))
            if (selected is None or l in selected) and l not in excluded]
  if not labels:
    raise scan.DatasetError(f"{where}: selects no class")
  split_id = _int_key(node, "node_split_id", where, 0)
  per_node = _int_key(node, "samples_per_node", where, 1)
  num_nodes = _int_key(node, "num_nodes", where, 1)
  seed = _int_key(node, "node_split_seed", where, 0)
  seed = 42 if seed is None else seed
  per_class = _int_key(node, "num_samples_per_class", where, 1)
  if per_class is None:
    per_class = _int_key(node, "num_samples", where, 1)
  if per_node is not None and num_nodes is not None:
    raise scan.DatasetError(f"{where}: give 'samples_per_node' or 'num_nodes', not both")
  if num_nodes is not None and split_id is not None and split_id >= num_nodes:
    raise scan.DatasetError(f"{where}: 'node_split_id' {split_id} must be < 'num_nodes' {num_nodes}")
  slicing = split_id is not None and (per_node is not None or num_nodes is not None)
  rng = np.random.RandomState(seed) if slicing else None
  parts = []
  for label in labels:
    idx = by_label.get(label, np.zeros(0, np.int64))
    if per_node is None and per_class is not None:
      idx = idx[:per_class]
    if not slicing:
      parts.append(idx)
      continue
    idx = idx[np.argsort([clipset.clips[i].clip_id for i in idx], kind="stable")]
    rng.shuffle(idx)
    n = len(idx)
    if per_node is not None:
      start, stop = split_id * per_node, (split_id + 1) * per_node
    else:
      share, rem = divmod(n, num_nodes)
      start = split_id * share + min(split_id, rem)
      stop = start + share + (1 if split_id < rem else 0)
    if stop > n:
      raise scan.DatasetError(
          f"{where}: class '{clipset.class_names[label]}' has {n} clips, not enough for "
          f"node_split_id {split_id} x samples_per_node {per_node} (needs {stop})")
    parts.append(idx[start:stop])
  out = np.concatenate(parts).astype(np.int64)
  if out.size == 0:
    raise scan.DatasetError(f"{where}: its classes {[clipset.class_names[l] for l in labels]} have no clips")
  return out


def reference_node_indices(clipset: ClipSet, nodes: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
  """Clip indices of each reference node, chosen as the reference chose them.

  Args:
    clipset: the dataset (e.g. from ``read_vegas``).
    nodes: reference node dicts, e.g. the third value returned by
      ``a2v_jax.reference.config.read_reference_config`` or :func:`one_class_nodes`. A node
      is named by its ``node_id`` key, else by its position.

  Returns:
    One int64 array per node of indices into ``clipset.clips``, in the reference's
    sample order (class by class, shuffled order within a class), which its
    stratified train/val/test split depends on.

  Raises:
    DatasetError: an unknown class or node key, a slice that needs more clips than
      the class has, a node selecting no class or no clip, or two nodes sharing
      clips (both nodes named).
  """
  by_label: dict[int, list[int]] = {}
  for i, clip in enumerate(clipset.clips):
    by_label.setdefault(clip.label, []).append(i)
  arrays = {l: np.asarray(v, np.int64) for l, v in by_label.items()}
  names = [str(n.get("node_id", i)) for i, n in enumerate(nodes)]
  out = [_node_indices(clipset, arrays, n, f"node '{name}'") for n, name in zip(nodes, names)]
  owner = np.full(len(clipset), -1, np.int64)
  for k, idx in enumerate(out):
    taken = owner[idx]
    clash = taken[taken >= 0]
    if clash.size:
      other = int(clash[0])
      shared = int(np.sum(taken == other))
      raise scan.DatasetError(
          f"nodes '{names[other]}' and '{names[k]}' share {shared} clips "
          f"(e.g. {clipset.clips[int(idx[taken == other][0])].clip_id}); give them different "
          "'node_split_id' slices or classes")
    owner[idx] = k
  return out
