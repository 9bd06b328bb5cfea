"""The federation's data: which clips each node trains, validates and tests on.

Why one object: every later stage (feature cache, client batches, evaluation)
needs the same node -> split -> clip indices, built once from the config, and a
printed summary is the quickest check that a partition is what the run intends.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from a2v_jax.config import Config
from a2v_jax.data.partition import SPLITS, partition, split
from a2v_jax.data.records import ClipSet
from a2v_jax.data.registry import read_dataset


@dataclasses.dataclass(frozen=True, eq=False)
class NodeData:
  """A dataset and, per node, its split -> sorted indices into ``clipset.clips``.

  Attributes:
    clipset: the (class-selected) dataset.
    nodes: one ``{"train", "val", "test"} -> int64 array`` mapping per node.
  """
  clipset: ClipSet
  nodes: tuple[dict[str, np.ndarray], ...]

  @property
  def num_nodes(self) -> int:
    return len(self.nodes)

  def counts(self) -> np.ndarray:
    """Clips per (node, split, class): int array ``(num_nodes, 3, num_classes)``, splits in SPLITS order."""
    labels = self.clipset.labels
    k = len(self.clipset.class_names)
    return np.array([[np.bincount(labels[node[s]], minlength=k) for s in SPLITS]
                     for node in self.nodes], np.int64)

  def summary(self) -> str:
    """A plain-text table of clips per node / split / class, with totals."""
    names = self.clipset.class_names
    counts = self.counts()
    widths = [max(len(n), 4) for n in names]
    head = f"{'node':>4}  {'split':<5}  {'total':>5}  " + "  ".join(
        f"{n:>{w}}" for n, w in zip(names, widths))
    lines = [f"{self.clipset.name}: {len(self.clipset)} clips, {len(names)} classes, "
             f"{self.num_nodes} nodes, {int(counts.sum())} clips assigned", head, "-" * len(head)]
    for k, node_counts in enumerate(counts):
      for s, row in zip(SPLITS, node_counts):
        lines.append(f"{k:>4}  {s:<5}  {int(row.sum()):>5}  " + "  ".join(
            f"{int(v):>{w}}" for v, w in zip(row, widths)))
    return "\n".join(lines)


def build_nodes(cfg: Config) -> NodeData:
  """Reads the dataset, partitions it over nodes and splits each node, all from ``cfg.data``.

  The partition uses ``node_split_seed``; node k's split uses ``node_split_seed + k``
  (as the reference's ``random_state = 42 + node_split_id``).
  """
  d = cfg.data
  clipset = read_dataset(d)
  if d.partition == "reference":
    from a2v_jax.data.reference_nodes import reference_node_indices
    parts = reference_node_indices(clipset, [dict(n) for n in d.reference_nodes])
  else:
    parts = partition(clipset, d.partition, d.num_nodes, seed=d.node_split_seed,
                      alpha=d.dirichlet_alpha, samples_per_node=d.samples_per_node)
  nodes = tuple(
      split(clipset, idx, d.split, seed=d.node_split_seed + k, train_ratio=d.train_ratio,
            val_ratio=d.val_ratio, test_ratio=d.test_ratio,
            official_val_fraction=d.official_val_fraction)
      for k, idx in enumerate(parts))
  return NodeData(clipset=clipset, nodes=nodes)
