"""The server's share of synthetic rows to the nodes (Run 2, ``server_synthetic_samples_per_class``).

Why: where each node holds one class (the reference's own experiments), a node's local training sees one
target and pulls its heads towards it; FedAvg of ten such models stays near chance. The server already
gathers the round's synthetic rows per class (``server_train.make_aggregate``); here it also sends every
participating node synthetic rows of the classes it lacks, drawn from the OTHER participants' synthetic
rows of the round (the reference's ``distribute_synthetic_samples_to_nodes``, which sent the server's
samples to every node but never let them train on them). A node then trains on its own rows plus these,
class-balanced: for every class it receives ``per_class`` minus the rows of that class it already has (none
where it holds enough), so a one-digit node trains on every digit, and a node holding every class (speaker
nodes) receives nothing and trains exactly as without the key.

What travels: only synthetic rows of the round's participants (``join_ratio < 1``: the sampled nodes), only to
participants; which rows a node receives is drawn each round (``share_key``) and, with
``synthetic_resample_each_round``, their content is new each round too. Rows are indices into the shared
feature array (synthetic rows sit there already), so a node's round data is one (C, W) index array of a
fixed width W: one compiled program whatever the sample.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

SHARE_SALT = 0x5A4E  # fold_in salt of the share's keys


def receive_counts(per_class: Union[int, str], train_rows: Sequence[np.ndarray], labels: np.ndarray,
                   num_classes: int, num_clients: int) -> np.ndarray:
  """(C, K) synthetic rows node c receives of class k: ``per_class`` minus what it holds of k (>= 0).

  Args:
    per_class: rows per class a node trains on at least, or ``'auto'`` = the node's train rows divided
      by the classes it holds (its own mean rows per class: the balanced set of a one-class node is ten
      equal classes).
    train_rows: each real node's train row indices (into ``labels``).
    labels: (N,) class of every row.
    num_classes: K.
    num_clients: C >= len(train_rows); padding clients receive nothing.
  """
  out = np.zeros((num_clients, num_classes), np.int64)
  labels = np.asarray(labels)
  for c, rows in enumerate(train_rows):
    held = np.bincount(labels[np.asarray(rows, np.int64)], minlength=num_classes)
    if per_class == "auto":
      want = len(rows) // max(1, int((held > 0).sum()))
    else:
      want = int(per_class)
    out[c] = np.maximum(want - held, 0)
  return out


def make_share(base_idx: np.ndarray, base_count: np.ndarray, syn_rows: np.ndarray, syn_nodes: np.ndarray,
               syn_labels: np.ndarray, receive: np.ndarray, width: int) -> Callable:
  """``share(participate, key) -> (idx (C, width), count (C,), sent (C,))``: a round's training rows.

  Node c's rows are its own ``base_idx[c, :base_count[c]]`` followed by, for each class k, up to
  ``receive[c, k]`` synthetic rows of class k drawn without replacement from the participants other than c
  (fewer when they hold fewer); ``sent[c]`` counts the received rows (0 for a non-participant).

  Args:
    base_idx: (C, W0) each node's own train rows, valid first.
    base_count: (C,) valid entries of ``base_idx``.
    syn_rows: (S,) rows of the feature array holding synthetic samples.
    syn_nodes: (S,) the node that drew each.
    syn_labels: (S,) their classes.
    receive: (C, K) rows to receive per class (:func:`receive_counts`).
    width: W >= max(base_count + receive.sum(1)): the round data's static width.
  """
  base_idx, base_count = np.asarray(base_idx, np.int32), np.asarray(base_count, np.int32)
  receive = np.asarray(receive, np.int32)
  num_clients, num_classes = receive.shape
  if width < int((base_count + receive.sum(1)).max()):
    raise ValueError(f"width {width} < the largest node's rows {int((base_count + receive.sum(1)).max())}")
  r_max = max(1, int(receive.max()))
  r_max = min(r_max, max(1, len(syn_rows)))
  rows = jnp.asarray(syn_rows, jnp.int32)
  nodes = jnp.asarray(syn_nodes, jnp.int32)
  labels = jnp.asarray(syn_labels, jnp.int32)
  classes = jnp.arange(num_classes)

  def share(participate, key):
    participate = jnp.asarray(participate, bool)
    # (C, K, S) eligible sources: class k, drawn by another participant.
    eligible = ((labels[None, None, :] == classes[None, :, None])
                & (nodes[None, None, :] != jnp.arange(num_clients)[:, None, None])
                & participate[nodes][None, None, :])
    noise = jax.random.uniform(key, eligible.shape)
    score, pick = jax.lax.top_k(jnp.where(eligible, noise, -1.0), r_max)  # (C, K, r_max)
    want = jnp.asarray(receive)[:, :, None] * participate[:, None, None]
    got = (score >= 0) & (jnp.arange(r_max) < want)
    got = got.reshape(num_clients, -1)
    own = jnp.arange(base_idx.shape[1])[None, :] < jnp.asarray(base_count)[:, None]
    valid = jnp.concatenate([own, got], axis=1)
    cand = jnp.concatenate([jnp.asarray(base_idx), rows[pick].reshape(num_clients, -1)], axis=1)
    order = jnp.argsort(~valid, axis=1, stable=True)[:, :width]
    idx = jnp.take_along_axis(jnp.where(valid, cand, 0), order, axis=1)
    if idx.shape[1] < width:
      idx = jnp.pad(idx, ((0, 0), (0, width - idx.shape[1])))
    return idx, valid.sum(1).astype(jnp.int32), got.sum(1).astype(jnp.int32)

  return jax.jit(share)


def share_key(seed: int, round_: int) -> jax.Array:
  """Key of the rows shared in ``round_``: a function of the round, so ``--resume`` repeats it bit for bit."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), SHARE_SALT), round_)
