"""Generator validation every Run 1 round: do the generators reproduce their classes, and do they draw them?

The design notes' troubleshooting judges generators by two numbers, both computed here after every round:

* **reconstruction** (VAEs): each node's validation rows (its ``val`` split; its train rows when it has none)
  through the generator that serves their class, encoded to the posterior mean and decoded without noise, in
  the generators' (standardised) units -> cosine similarity, MSE and L1, per node and per class;
* **class probe**: samples of every (node, class) labelled by the nearest real class-mean feature (the class
  means of all nodes' train rows); the share labelled with their own class. The same probe on the real
  validation rows is its yardstick (real clips are not all nearest their class mean either). A conditioned
  generator that ignores its condition draws every class near one mean and scores near 1 / classes.

Row entries: ``val/node_{i}/generator_{recon_cos,recon_mse,recon_l1,probe}``, ``val/class_{name}/generator_
{recon_cos,recon_mse,recon_l1,probe}``, ``val/generator_probe`` (all samples) and ``val/real_probe``.
Nothing here changes the generators or consumes their keys: a run with validation trains the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.generators import training as gt
from a2v_jax.types import PRNGKey

SAMPLES_PER_CLASS = 20  # probe samples per (node, class): 2 decimals of a per-node share, a few ms to draw


@dataclasses.dataclass(frozen=True)
class Validation:
  """Fixed inputs of a run's generator validation (host arrays, standardised units)."""
  means: np.ndarray        # (K, S*D) class means of all nodes' train rows
  rows: np.ndarray         # (R, S, D) every node's validation rows
  labels: np.ndarray       # (R,)
  node: np.ndarray         # (R,) node of each row
  counts: np.ndarray       # (C, K) probe samples per node and class (classes the node trains on)
  real_probe: float        # the probe's score on ``rows``
  source: str              # "val" or "train": where ``rows`` came from


def nearest_mean(means: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Index of the nearest (Euclidean) class mean of each row of x (N, S, D)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  m = np.asarray(means, np.float64)
  d = (x * x).sum(1)[:, None] - 2 * x @ m.T + (m * m).sum(1)[None]
  return d.argmin(1)


def make_validation(pool: np.ndarray, pool_labels: np.ndarray, train_rows: Sequence[np.ndarray],
                    val_pool: np.ndarray, val_labels: np.ndarray, val_node: np.ndarray, num_classes: int,
                    source: str) -> Validation:
  """Class means of the train ``pool`` (R, S, D) and the real rows' own probe score.

  ``train_rows[c]`` are node c's pool rows: a node is probed on the classes it trains on.
  """
  pool = np.asarray(pool, np.float32)
  pool_labels = np.asarray(pool_labels)
  flat = pool.reshape(len(pool), -1)
  means = np.stack([flat[pool_labels == k].mean(0) if (pool_labels == k).any() else np.full(flat.shape[1], np.inf)
                    for k in range(num_classes)])
  counts = np.zeros((len(train_rows), num_classes), np.int64)
  for c, rows in enumerate(train_rows):
    counts[c, np.unique(pool_labels[rows])] = SAMPLES_PER_CLASS
  real = float(np.mean(nearest_mean(means, val_pool) == val_labels)) if len(val_pool) else float("nan")
  return Validation(means, np.asarray(val_pool, np.float32), np.asarray(val_labels), np.asarray(val_node),
                    counts, real, source)


@functools.lru_cache(maxsize=None)
def _compiled_reconstruct(spec: gt.GeneratorSpec) -> Callable:
  vae = gt.models(spec)["vae"]

  def slot(params, x, labels, cond_table):
    cond = cond_table[labels] if spec.conditioned else None
    mu, _ = vae.apply(params, x, cond, method=vae.encode)
    return vae.apply(params, mu, cond, method=vae.decode)

  return jax.jit(jax.vmap(slot, in_axes=(0, 0, 0, None)))


def row_slots(layout: gt.SlotLayout, labels: np.ndarray, node: np.ndarray) -> np.ndarray:
  """The slot serving each row's (node, class); -1 where none does."""
  slots = [layout.slot_for_class(int(n), int(k)) for n, k in zip(node, labels)]
  return np.array([-1 if s is None else s for s in slots], np.int64)


def served_rows(state: gt.GenState, labels: np.ndarray, slots: np.ndarray) -> np.ndarray:
  """Rows whose node has a generator trained on their class (a node's val split may hold classes it does not
  train on: those have nothing to be reconstructed by)."""
  seen = np.asarray(state.seen)
  return (slots >= 0) & seen[np.maximum(slots, 0), labels]


def reconstruct(state: gt.GenState, x: np.ndarray, labels: np.ndarray, node: np.ndarray,
                slots: Optional[np.ndarray] = None) -> np.ndarray:
  """Posterior-mean reconstructions (R, S, D) of rows x, each through the slot serving (its node, its class)
  (``slots``: those slots, when the caller has them)."""
  layout = state.layout
  slots = row_slots(layout, labels, node) if slots is None else slots
  if (slots < 0).any():
    raise ValueError("a validation row has no generator slot for its class")
  order = [np.flatnonzero(slots == s) for s in range(layout.num_slots)]
  width = max([len(o) for o in order] + [1])
  idx = np.zeros((layout.num_slots, width), np.int64)
  for s, o in enumerate(order):
    idx[s, :len(o)] = o
  x_hat = _compiled_reconstruct(state.spec)(state.params, jnp.asarray(x[idx]), jnp.asarray(labels[idx], jnp.int32),
                                            state.cond_table)
  out = np.empty_like(x)
  for s, o in enumerate(order):
    out[o] = np.asarray(x_hat[s, :len(o)])
  return out


def _recon_stats(x_hat: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
  a, b = x_hat.reshape(len(x), -1).astype(np.float64), x.reshape(len(x), -1).astype(np.float64)
  cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
  return {"recon_cos": cos, "recon_mse": ((a - b) ** 2).mean(1), "recon_l1": np.abs(a - b).mean(1)}


def validate(state: gt.GenState, val: Validation, key: PRNGKey) -> dict[str, float]:
  """The round's validation entries (see the module docstring)."""
  layout, names = state.layout, state.layout.class_name
  row: dict[str, float] = {}
  groups = {f"node_{c}": val.node == c for c in range(layout.num_nodes)}
  groups.update({f"class_{names(k)}": val.labels == k for k in range(state.spec.num_classes)})
  slots = row_slots(layout, val.labels, val.node)
  served = served_rows(state, val.labels, slots)
  if state.spec.generator_type == "vae" and served.any():
    x_hat = reconstruct(state, val.rows[served], val.labels[served], val.node[served], slots[served])
    stats = _recon_stats(x_hat, val.rows[served])
    for g, sel in groups.items():
      sel = sel[served]
      if sel.any():
        row.update({f"val/{g}/generator_{k}": float(v[sel].mean()) for k, v in stats.items()})
  x, y, valid = gt.sample_generators(state, key, val.counts, allow_mixture=True)
  x, y, valid = np.asarray(x), np.asarray(y), np.asarray(valid)
  hit = nearest_mean(val.means, x[valid]) == y[valid]
  node = np.broadcast_to(np.arange(x.shape[0])[:, None], y.shape)[valid]
  for g, sel in {**{f"node_{c}": node == c for c in range(layout.num_nodes)},
                 **{f"class_{names(k)}": y[valid] == k for k in range(state.spec.num_classes)}}.items():
    if sel.any():
      row[f"val/{g}/generator_probe"] = float(hit[sel].mean())
  row["val/generator_probe"] = float(hit.mean())
  row["val/real_probe"] = val.real_probe
  return row
