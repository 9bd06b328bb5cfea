"""Client and server optimisers: one AdamW per branch, the reference's schedules.

Learning rates are applied from an explicit *epoch index* (round * local_epochs + epoch), as the
reference steps its schedulers per epoch with that index. The AdamW transform runs with
learning rate 1 and its update is scaled by the branch's scheduled rate, which is exactly AdamW
with that rate (optax and torch both multiply the decoupled weight decay by the rate too).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from a2v_jax.config import Config


def cosine_warm_restarts(lr0: float, period: int, eta_min: float = 1e-8) -> Callable[[jax.Array], jax.Array]:
  """torch CosineAnnealingWarmRestarts(T_0=period, T_mult=1) evaluated at an explicit epoch."""
  period = max(int(period), 1)

  def schedule(epoch):
    t = jnp.mod(epoch, period) / period
    return eta_min + (lr0 - eta_min) * (1 + jnp.cos(jnp.pi * t)) / 2

  return schedule


def cosine_annealing(lr0: float, t_max: int, eta_min: float = 1e-6) -> Callable[[jax.Array], jax.Array]:
  """torch CosineAnnealingLR closed form at an explicit epoch (the reference's t5 schedule)."""
  t_max = max(int(t_max), 1)
  return lambda epoch: eta_min + (lr0 - eta_min) * (1 + jnp.cos(jnp.pi * epoch / t_max)) / 2


def branch_schedules(cfg: Config) -> dict[str, Callable[[jax.Array], jax.Array]]:
  """{branch: epoch -> learning rate} for the branches of this diffusion type."""
  t, f = cfg.train, cfg.federation
  out = {}
  for b in cfg.branches:
    lr = getattr(t, f"{b}_adapter_learning_rate")
    if getattr(t, f"{b}_adapter_learning_rate_schedule"):
      if b == "clip":
        out[b] = cosine_warm_restarts(lr, t.local_epochs * f.global_rounds // 10)
      else:
        out[b] = cosine_annealing(lr, f.global_rounds)
    elif t.learning_rate_decay == "cosine":
      out[b] = cosine_annealing(lr, f.global_rounds * t.local_epochs, eta_min=0.0)
    else:
      out[b] = lambda epoch, lr=lr: jnp.asarray(lr, jnp.float32)
  return out


def client_optimizer(cfg: Config) -> optax.GradientTransformation:
  """AdamW per branch (weight decay per branch), optional global-norm clipping at 1.0 per branch."""
  def one(branch):
    wd = getattr(cfg.train, f"{branch}_adapter_weight_decay")
    parts = [optax.clip_by_global_norm(1.0)] if cfg.train.optimizer_clip_gradients else []
    parts.append(optax.adamw(1.0, weight_decay=wd))
    return optax.chain(*parts)
  return optax.multi_transform({b: one(b) for b in cfg.branches},
                               lambda params: {k: k for k in params})


def scale_by_branch_lr(updates: Mapping[str, object], epoch: jax.Array,
                       schedules: Mapping[str, Callable]) -> dict:
  """Multiplies each branch's unit-rate AdamW update by its scheduled learning rate."""
  return {b: jax.tree.map(lambda u, s=schedules[b](epoch): (u * s).astype(u.dtype), u)
          for b, u in updates.items()}


def server_optimizer(cfg: Config) -> optax.GradientTransformation:
  """Server transform on the (negated) mean client delta; sgd(1.0) is plain FedAvg.

  References:
    Reddi et al. 2021, "Adaptive Federated Optimization" (FedAdam);
    Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution" (FedAvgM).
  """
  f = cfg.federation
  if f.adapter_aggregation_mode == "centralised":
    # One node holds all the data: its model is the model. A server step on its own round delta would
    # only add heavy-ball momentum across rounds to a single optimiser, so "only the mode changed"
    # comparisons against FedAvgM/FedAdam configs stay meaningful.
    return optax.sgd(1.0)
  if f.server_optimizer == "adam":
    return optax.adam(f.server_learning_rate, b1=f.server_momentum or 0.9, eps=1e-8)
  return optax.sgd(f.server_learning_rate, momentum=f.server_momentum or None)
