"""Server-side aggregation of synthetic samples and global training of the heads (Run 2 of the reference's design notes).

The design notes' Run 2: every node trains its heads on its real clips, draws
``synthetic_samples_per_class`` synthetic AST features per class from its generators, and sends heads
and synthetic features to the server; the server aggregates the heads (FedAvg) and the synthetic
features per class across nodes, then (``global_model_train``) trains the global heads on the aggregated
features for ``global_model_train_epochs`` epochs. This module is that server step, done as the notes
intend where the reference had dead code (its aggregation was never consumed, its global-training
paths raised or returned 0):

* inputs: the round's aggregated synthetic rows, plus each node's per-class MEAN real feature when the
  nodes train on real features (one (T, D) row per node and class: what a node may share; never a clip);
* targets, by class: the text embeddings the nodes regress (default), or with
  ``global_model_train_from_nodes_adapters`` the nodes' own heads' mean output per class -- each node
  averages its heads' outputs over its train rows of the class, the server averages those means over
  the nodes holding the class (the reference's intended "mean client CLIP output", for every branch).
  A class no node
  holds keeps its text target;
* optimisation: exactly a node's local training (``local.make_local_train``: shuffled batches of
  ``batch_size``, MSE per branch, padding rows ignored), run on the server params with a fresh AdamW at
  ``global_model_train_learning_rate`` (each branch's adapter weight decay, no schedule, no drift
  correction) for ``global_model_train_epochs`` epochs; the result is the global model the next round
  broadcasts. Keys are ``fold_in(seed key, round)``: a resumed run repeats the step bit for bit.

Rows are indices into the shared feature array (synthetic rows are already there for the nodes, and the
class means are appended once at start-up), so the step gathers per batch like the nodes do and never
copies the aggregated set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.config import Config
from a2v_jax.federated import optim
from a2v_jax.federated.evaluate import predict
from a2v_jax.federated.local import Shared, make_local_train
from a2v_jax.federated.state import ClientState

SERVER_SALT = 0x5E7F  # fold_in salt of the server step's keys


def aggregate_counts(counts: np.ndarray, class_names: Sequence[str]) -> tuple[dict[str, int], list[str]]:
  """The server's per-class aggregation of the nodes' synthetic samples: its metrics and log lines.

  Args:
    counts: (C, K) synthetic samples node n sends for class k.
    class_names: K names.

  Returns:
    ({server/synthetic_samples_total, server/synthetic_samples_classes}, lines): the design notes' log,
    "Aggregated N synthetic samples across K classes" then one line per class, for a round in which
    every node takes part (``make_aggregate`` counts each round's participants).
  """
  counts = np.asarray(counts, np.int64)
  per_class = counts.sum(0)
  row = {"server/synthetic_samples_total": int(per_class.sum()),
         "server/synthetic_samples_classes": int((per_class > 0).sum())}
  senders = int((counts.sum(1) > 0).sum())
  lines = [f"server: Aggregated {row['server/synthetic_samples_total']} synthetic samples across "
           f"{row['server/synthetic_samples_classes']} classes from {senders} node(s)"]
  for k in np.flatnonzero(per_class):
    holders = counts[:, k][counts[:, k] > 0]
    how = (f"{holders[0]} per node x {len(holders)} node(s)" if np.all(holders == holders[0])
           else f"from {len(holders)} node(s)")
    lines.append(f"  - {class_names[k]}: {per_class[k]} samples ({how})")
  return row, lines


def make_aggregate(indices: np.ndarray, nodes: np.ndarray, labels: np.ndarray, synthetic: np.ndarray,
                   num_classes: int, multiple: int) -> Callable:
  """``aggregate(participate) -> (idx, count, per_class)``: the server's per-class gather of one round.

  What the round's participants send -- their synthetic rows (and class-mean rows) -- is gathered by one
  jitted call over a fixed-size index vector, so the server step compiles once whatever the sample:
  the rows of nodes with ``participate[node]`` come first, in their original (node-major, then class)
  order, the rest follow as padding.

  Args:
    indices: (N,) candidate rows of the feature array (every node's synthetic rows, then class means).
    nodes: (N,) the node each row comes from.
    labels: (N,) the class of each row.
    synthetic: (N,) bool, synthetic rows (counted in ``per_class``; class means are not samples).
    num_classes: K.
    multiple: the server step's batch size (``idx`` is padded to a multiple of it).

  Returns of the jitted function (``participate``: (C,) bool over the engine's clients):
    idx (P,) int32 with the round's rows first, count (rows to train on), per_class (K,) synthetic
    samples the server aggregated per class this round.
  """
  n = len(indices)
  size = max(multiple, -(-n // multiple) * multiple)
  fill = lambda a, v: np.concatenate([np.asarray(a), np.full((size - n,), v, np.asarray(a).dtype)])
  idx_all = jnp.asarray(fill(np.asarray(indices, np.int32), indices[0] if n else 0))
  node = jnp.asarray(fill(np.asarray(nodes, np.int32), -1))
  label = jnp.asarray(fill(np.asarray(labels, np.int32), 0))
  syn = jnp.asarray(fill(np.asarray(synthetic, bool), False))

  def aggregate(participate):
    valid = (node >= 0) & jnp.asarray(participate, bool)[jnp.maximum(node, 0)]
    order = jnp.argsort(~valid, stable=True)
    per_class = jax.ops.segment_sum((valid & syn).astype(jnp.int32), label, num_segments=num_classes)
    return idx_all[order], valid.sum(), per_class

  return jax.jit(aggregate)


def class_means(features: Any, labels: np.ndarray, node_rows: Sequence[np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each node's mean feature per class over its rows: what a node shares instead of clips.

  Returns:
    (means (M, T, D) float32, labels (M,), nodes (M,)), one row per (node, class present), node-major.
  """
  out, labs, nodes = [], [], []
  labels = np.asarray(labels)
  for n, rows in enumerate(node_rows):
    rows = np.asarray(rows, np.int64)
    for k in np.unique(labels[rows]):
      sel = np.sort(rows[labels[rows] == k])
      out.append(np.asarray(features[sel], np.float64).mean(0).astype(np.float32))
      labs.append(int(k))
      nodes.append(n)
  if not out:
    raise ValueError("no node has rows to average")
  return np.stack(out), np.asarray(labs, np.int32), np.asarray(nodes, np.int32)


def server_config(cfg: Config) -> Config:
  """The config of the server's training pass: a node's local training with the server's epochs and
  learning rate, no schedule, no drift correction, no reproduced reference bug."""
  lr = cfg.federation.global_model_train_learning_rate
  train = dataclasses.replace(
      cfg.train, local_epochs=cfg.federation.global_model_train_epochs, clip_adapter_learning_rate=lr,
      t5_adapter_learning_rate=lr, clip_adapter_learning_rate_schedule=False,
      t5_adapter_learning_rate_schedule=False, learning_rate_decay="none", reference_batch_target_bug=False)
  fed = dataclasses.replace(cfg.federation, local_drift_correction="none")
  return dataclasses.replace(cfg, train=train, federation=fed)


def make_server_train(cfg: Config, apply_fn: Callable, num_rows: int) -> Callable:
  """``train(params, idx, count, shared, key) -> (params, metrics)``: the server's global training, jitted.

  Args of the returned function:
    params: the global heads after FedAvg.
    idx: (P,) rows of ``shared.features`` to train on, P a multiple of ``batch_size`` >= ``num_rows``.
    count: the valid rows (the first ``count`` of ``idx``).
    shared: features, labels and the per-class target table (text targets or :func:`make_node_targets`).
    key: the round's key (epoch shuffles).

  Returns:
    (params, {"{branch}_loss": the last epoch's mean batch loss}).
  """
  scfg = server_config(cfg)
  bsz = cfg.train.batch_size
  tx = optim.client_optimizer(scfg)
  local = make_local_train(scfg, apply_fn, tx, bsz, max(1, -(-num_rows // bsz)))

  def train(params, idx, count, shared: Shared, key):
    state = ClientState(params=params, opt_state=tx.init(params), rng=key, control=None)
    state, metrics = local(state, idx, count, jnp.zeros((), jnp.int32), shared)
    return state.params, metrics

  return jax.jit(train)


def make_node_targets(apply_fn: Callable, batch_size: int) -> Callable:
  """``targets(client_params, idx, count, shared) -> {branch: (K, ...)}``: per-class mean node outputs.

  Node c averages its heads' outputs over its own rows ``idx[c, :count[c]]`` of each class; the server
  averages those means uniformly over the nodes holding the class. Classes no node holds keep
  ``shared.targets`` (the text embeddings). One vmap over nodes; jitted once per run.
  """
  def per_node(params, idx, count, shared):
    out = predict(apply_fn, params, idx, shared, batch_size)
    k = next(iter(shared.targets.values())).shape[0]
    onehot = jax.nn.one_hot(shared.labels[idx], k) * (jnp.arange(idx.shape[0]) < count)[:, None]
    n = onehot.sum(0)
    means = {b: jnp.tensordot(onehot, o.astype(jnp.float32), axes=(0, 0))
             / jnp.maximum(n, 1.0).reshape((-1,) + (1,) * (o.ndim - 1)) for b, o in out.items()}
    return means, n > 0

  def targets(client_params, idx, count, shared: Shared):
    means, holds = jax.vmap(per_node, in_axes=(0, 0, 0, None))(client_params, idx, count, shared)
    w = holds.astype(jnp.float32)
    nodes = w.sum(0)
    out = {}
    for b, m in means.items():
      shape = (-1,) + (1,) * (m.ndim - 2)
      mean = jnp.sum(w.reshape(w.shape + (1,) * (m.ndim - 2)) * m, 0) / jnp.maximum(nodes, 1.0).reshape(shape)
      out[b] = jnp.where((nodes > 0).reshape(shape), mean, shared.targets[b].astype(jnp.float32))
    return out

  return jax.jit(targets)


def server_key(cfg: Config, round_: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.experiment.seed), SERVER_SALT), round_)
