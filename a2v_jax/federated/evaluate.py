"""Evaluation of one model on a padded index set; vmapped over clients by the caller."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from a2v_jax import metrics as metrics_lib
from a2v_jax.federated.local import Shared


def predict(apply_fn: Callable, params, idx: jax.Array, shared: Shared, batch_size: int):
  """Predictions for rows ``idx`` (length a multiple of batch_size), batch by batch."""
  batches = idx.reshape(-1, batch_size)
  out = jax.lax.map(lambda rows: apply_fn(params, shared.features[rows]), batches)
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)


def make_evaluator(apply_fn: Callable, batch_size: int) -> Callable:
  """Returns ``evaluate(params, idx, count, shared) -> {metric: scalar}`` for one model."""

  def evaluate(params, idx: jax.Array, count: jax.Array, shared: Shared):
    preds = predict(apply_fn, params, idx, shared, batch_size)
    mask = jnp.arange(idx.shape[0]) < count
    return metrics_lib.all_metrics(preds, shared.labels[idx], shared.targets, mask)

  return evaluate


def pad_indices(indices, multiple: int, fill: int = 0):
  """numpy helper: pads an index vector to a multiple of ``multiple`` (count kept separately)."""
  import numpy as np
  n = len(indices)
  size = max(multiple, -(-n // multiple) * multiple)
  out = np.full((size,), fill, np.int32)
  out[:n] = indices
  return out, n
