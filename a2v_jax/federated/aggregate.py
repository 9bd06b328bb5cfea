"""Aggregation of client-stacked pytrees: pure functions, each tested alone against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from a2v_jax.types import Params


def weighted_mean(stacked: Params, weights: jax.Array) -> Params:
  """sum_c w_c x_c / sum_c w_c over the leading client axis (zero total weight -> zeros).

  Args:
    stacked: pytree whose leaves have a leading client axis C.
    weights: (C,) non-negative weights (uniform FedAvg: participation mask; weighted: sample counts).
  """
  w = weights.astype(jnp.float32)
  total = jnp.maximum(w.sum(), 1e-12)

  def mean(x):
    wx = jnp.tensordot(w, x.astype(jnp.float32), axes=(0, 0))
    return (wx / total).astype(x.dtype)

  return jax.tree.map(mean, stacked)


def client_weights(mode: str, counts: jax.Array, participate: jax.Array) -> jax.Array:
  """FedAvg weights: uniform over participants (the reference) or by their sample counts.

  References:
    McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data".
  """
  p = participate.astype(jnp.float32)
  if mode == "weighted":
    return p * counts.astype(jnp.float32)
  return p * (counts > 0)


def broadcast(params: Params, num_clients: int) -> Params:
  """Copies the global params to every client (leading axis C)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), params)


def select(mask: jax.Array, new: Params, old: Params) -> Params:
  """Per-client choice: new where mask[c] else old."""
  def pick(n, o):
    m = mask.reshape((-1,) + (1,) * (n.ndim - 1))
    return jnp.where(m, n, o)
  return jax.tree.map(pick, new, old)
