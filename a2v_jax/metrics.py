"""Embedding-space metrics of predicted conditioning embeddings against per-class text targets.

Without a GPU we cannot render, so the heads are judged where they are trained: nearest-target
accuracy (is the prediction closest, by cosine, to its own class's target?), centred cosine
(cosine after removing the mean target, which all classes share and which makes raw cosines of
text embeddings uninformatively high), MSE and MSE normalised by the targets' variance.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def _unit(x: jax.Array) -> jax.Array:
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def branch_metrics(pred: jax.Array, labels: jax.Array, table: jax.Array,
                   mask: jax.Array) -> dict[str, jax.Array]:
  """Masked metrics of one branch.

  Args:
    pred: (n, ...) predictions.
    labels: (n,) class indices.
    table: (num_classes, ...) per-class targets.
    mask: (n,) 1 for real rows, 0 for padding.

  Returns:
    accuracy, centred_cosine, mse, nmse (scalars).
  """
  n, c = pred.shape[0], table.shape[0]
  p = pred.reshape(n, -1).astype(jnp.float32)
  t = table.reshape(c, -1).astype(jnp.float32)
  y = t[labels]
  w = mask.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  nearest = jnp.argmax(_unit(p) @ _unit(t).T, axis=-1)
  mu = t.mean(0)
  centred = jnp.sum(_unit(p - mu) * _unit(y - mu), axis=-1)
  mse = jnp.mean(jnp.square(p - y), axis=-1)
  var = jnp.mean(jnp.var(t, axis=0))
  masked = lambda v: jnp.sum(v * w) / denom
  return {"accuracy": masked((nearest == labels).astype(jnp.float32)),
          "centred_cosine": masked(centred), "mse": masked(mse),
          "nmse": masked(mse) / jnp.maximum(var, 1e-12)}


def all_metrics(preds: Mapping[str, jax.Array], labels: jax.Array,
                targets: Mapping[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
  """{f"{branch}_{metric}": value} for every branch."""
  out = {}
  for b, p in preds.items():
    for k, v in branch_metrics(p, labels, targets[b], mask).items():
      out[f"{b}_{k}"] = v
  return out
