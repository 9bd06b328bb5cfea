"""Synthetic stand-ins for the frozen stages (features, targets, nodes): engine tests need no backbone."""

from __future__ import annotations

import numpy as np

from a2v_jax.data.nodes import NodeData
from a2v_jax.data.records import Clip, ClipSet
from a2v_jax.run.trainer import Prepared


def synthetic_prepared(num_nodes=3, per_node=(24, 17, 30), classes=4, tokens=6, dim=8,
                       seed=0, t5=(3, 6), clip=4, node_classes=None) -> Prepared:
  """Gaussian clusters of token features per class; random per-class targets. ``node_classes[n]``: the
  classes node n draws its labels from (default: all)."""
  rs = np.random.RandomState(seed)
  centers = rs.randn(classes, dim).astype(np.float32)
  clips, feats, nodes = [], [], []
  for n in range(num_nodes):
    start = len(clips)
    count = per_node[n % len(per_node)]
    for i in range(count):
      label = int(rs.randint(classes)) if node_classes is None else int(rs.choice(node_classes[n]))
      clips.append(Clip(path=f"/nonexistent/{n}_{i}.wav", label=label, group=f"g{n}",
                        clip_id=f"{n}_{i}", split="test" if i % 5 == 0 else "train"))
      feats.append(centers[label] + 0.7 * rs.randn(tokens, dim))
    own = np.arange(start, len(clips))
    test = own[(own - start) % 5 == 0]
    val = own[(own - start) % 5 == 1]
    train = np.setdiff1d(own, np.concatenate([test, val]))
    nodes.append({"train": train, "val": val, "test": test})
  cs = ClipSet("synthetic", tuple(f"c{i}" for i in range(classes)), tuple(clips))
  targets = {"clip": rs.randn(classes, clip).astype(np.float32),
             "t5": rs.randn(classes, *t5).astype(np.float32)}
  return Prepared(NodeData(cs, tuple(nodes)), np.asarray(feats, np.float32), targets)
