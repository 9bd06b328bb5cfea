"""Local training of ONE client; the client axis is added by ``engine.py`` alone.

A client's data are indices into the shared, cached feature array; padding positions carry a
mask, so clients of different sizes share one compiled program. An epoch shuffles the client's
valid indices (``drop_last=False`` like the reference loader) and scans over fixed-size batches;
a batch with no valid row leaves params and optimiser state untouched.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from a2v_jax.config import Config
from a2v_jax.federated import optim, privacy
from a2v_jax.federated.state import ClientState
from a2v_jax.types import Params


class Shared(NamedTuple):
  """Arrays every client reads (not vmapped): cached features, labels, per-class targets."""
  features: jax.Array              # (N_all, T, D_ast)
  labels: jax.Array                # (N_all,) int32
  targets: Mapping[str, jax.Array]  # {branch: (num_classes, ...)}


def branch_losses(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
                  mask: jax.Array, cosine_weight: float) -> dict[str, jax.Array]:
  """Masked mean over the batch of per-sample MSE (+ optional 1 - cosine), per branch."""
  denom = jnp.maximum(mask.sum(), 1.0)
  out = {}
  for b, o in outputs.items():
    o = o.astype(jnp.float32).reshape(o.shape[0], -1)
    y = targets[b].astype(jnp.float32).reshape(o.shape[0], -1)
    per_sample = jnp.mean(jnp.square(o - y), axis=-1)
    if cosine_weight:
      cos = jnp.sum(o * y, -1) / (jnp.linalg.norm(o, axis=-1) * jnp.linalg.norm(y, axis=-1) + 1e-8)
      per_sample = per_sample + cosine_weight * (1.0 - cos)
    out[b] = jnp.sum(per_sample * mask) / denom
  return out


def make_local_train(cfg: Config, apply_fn: Callable, tx: optax.GradientTransformation,
                     batch_size: int, steps_per_epoch: int) -> Callable:
  """Returns ``local_train(client, idx, count, epoch0, shared, server_control=None) -> (client, metrics)``.

  One client. With ``local_drift_correction: fedprox`` the local loss gains mu/2 ||w - w0||^2, w0 the
  params the client starts the round from (the global model in averaging modes); with ``scaffold``
  every gradient is corrected by ``server_control - client.control`` and the client's new control is
  the mean of its uncorrected gradients over the round's real steps (untouched when it had none).

  Args:
    cfg: run config (local_epochs, cosine weight, reference batch-target bug switch).
    apply_fn: ``apply_fn(params, tokens) -> {branch: output}``.
    tx: the client optimiser (unit learning rate, see optim.py).
    batch_size: B.
    steps_per_epoch: ceil(n_max / B) for the largest client; idx arrays hold steps * B entries.
  """
  schedules = optim.branch_schedules(cfg)
  cosine_weight = float(cfg.train.cosine_loss_weight)
  first_target_bug = cfg.train.reference_batch_target_bug
  local_epochs = cfg.train.local_epochs
  correction = cfg.federation.local_drift_correction
  mu = float(cfg.federation.fedprox_mu) if correction == "fedprox" else 0.0
  scaffold = correction == "scaffold"
  dp = cfg.privacy.dp_level == "record"
  if dp and cfg.privacy.dp_noise_multiplier is None:
    raise ValueError("record-level DP needs the noise multiplier (calibrate dp_target_epsilon first: "
                     "privacy.calibrate)")
  clip, sigma = float(cfg.privacy.dp_l2_clip), float(cfg.privacy.dp_noise_multiplier or 0.0)

  def example_loss(params: Params, xi, yi):
    losses = branch_losses(apply_fn(params, xi[None]), {b: v[None] for b, v in yi.items()}, jnp.ones((1,)),
                           cosine_weight)
    return sum(losses.values()), losses

  def dp_grads(params: Params, x, y, mask, anchor, key):
    """DP-SGD's gradient: per-example gradients clipped, summed with Gaussian noise, over the batch size
    (privacy.py); FedProx's proximal term (no data in it) is added after."""
    grads, per_example = privacy.per_example_grads(example_loss, params, x, y)
    summed, _ = privacy.clipped_noisy_sum(grads, mask, clip, sigma, key)
    grads = jax.tree.map(lambda g: g / batch_size, summed)
    if mu:
      grads = jax.tree.map(lambda g, p, a: g + mu * (p - a), grads, params, anchor)
    denom = jnp.maximum(mask.sum(), 1.0)
    return grads, {b: jnp.sum(v * mask) / denom for b, v in per_example.items()}

  def loss_fn(params: Params, x, y, mask, anchor):
    losses = branch_losses(apply_fn(params, x), y, mask, cosine_weight)
    total = sum(losses.values())
    if mu:
      total = total + 0.5 * mu * optax.tree.norm(jax.tree.map(jnp.subtract, params, anchor), squared=True)
    return total, losses

  def local_train(client: ClientState, idx: jax.Array, count: jax.Array, epoch0: jax.Array,
                  shared: Shared, server_control: Optional[Params] = None):
    positions = jnp.arange(idx.shape[0])
    valid = positions < count
    anchor = client.params if mu else None  # FedProx's w0 (not differentiated: a closed-over value)
    shift = jax.tree.map(jnp.subtract, server_control, client.control) if scaffold else None

    def one_step(carry, step):
      params, opt_state, grad_sum, order, epoch, noise_key = carry
      pos = jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size)
      bmask = ((step * batch_size + jnp.arange(batch_size)) < count).astype(jnp.float32)
      rows = idx[pos]
      labels = shared.labels[rows]
      if first_target_bug:  # reference VEGAS collate: the first sample's class for the whole batch
        labels = jnp.broadcast_to(labels[0], labels.shape)
      x = shared.features[rows]
      y = {b: t[labels] for b, t in shared.targets.items()}

      def train(state):
        params, opt_state, grad_sum = state
        if dp:
          grads, losses = dp_grads(params, x, y, bmask, anchor, jax.random.fold_in(noise_key, step))
        else:
          (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, bmask, anchor)
        if scaffold:
          grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
          grads = jax.tree.map(jnp.add, grads, shift)
        updates, new_opt = tx.update(grads, opt_state, params)
        updates = optim.scale_by_branch_lr(updates, epoch, schedules)
        return (optax.apply_updates(params, updates), new_opt, grad_sum), losses

      def skip(state):
        losses = jax.eval_shape(train, state)[1]  # the branches the heads have (maybe fewer than targets)
        return state, jax.tree.map(lambda l: jnp.zeros(l.shape, l.dtype), losses)

      # A step without rows (padding of a smaller client, a non-participant) leaves the state exactly
      # as it was. Unbatched, cond skips the work and the extra pass over params and moments; under
      # vmap it lowers to the same select as before.
      has_data = bmask.sum() > 0
      (params, opt_state, grad_sum), losses = jax.lax.cond(has_data, train, skip,
                                                           (params, opt_state, grad_sum))
      return (params, opt_state, grad_sum, order, epoch, noise_key), (losses, has_data)

    def one_epoch(carry, e):
      params, opt_state, grad_sum, n_steps, rng = carry
      rng, sub = jax.random.split(rng)
      # DP-SGD's noise key: derived from the shuffle's, so a DP run shuffles exactly as the same run without DP
      noise_key = jax.random.fold_in(sub, privacy.NOISE_SALT) if dp else None
      noise = jax.random.uniform(sub, idx.shape)
      order = jnp.argsort(jnp.where(valid, noise, 2.0))  # valid rows first, shuffled
      (params, opt_state, grad_sum, _, _, _), (losses, real) = jax.lax.scan(
          one_step, (params, opt_state, grad_sum, order, epoch0 + e, noise_key), jnp.arange(steps_per_epoch))
      n_real = jnp.maximum(real.sum(), 1)
      return ((params, opt_state, grad_sum, n_steps + real.sum(), rng),
              {b: l.sum() / n_real for b, l in losses.items()})

    grad_sum = jax.tree.map(jnp.zeros_like, client.params) if scaffold else None
    (params, opt_state, grad_sum, n_steps, rng), per_epoch = jax.lax.scan(
        one_epoch, (client.params, client.opt_state, grad_sum, jnp.zeros((), jnp.int32), client.rng),
        jnp.arange(local_epochs))
    metrics = {f"{b}_loss": v[-1] for b, v in per_epoch.items()}
    client = client.replace(params=params, opt_state=opt_state, rng=rng)
    if scaffold:  # no real step: the old control stands (a non-participant, a padded client)
      control = jax.tree.map(lambda s, c: jnp.where(n_steps > 0, s / jnp.maximum(n_steps, 1), c),
                             grad_sum, client.control)
      client = client.replace(control=control)
    return client, metrics

  return local_train
