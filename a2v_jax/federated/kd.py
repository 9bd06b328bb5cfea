"""Knowledge-distillation aggregation (``adapter_aggregation_mode: kd``): pure functions, jitted once.

A KD round (done as the reference intended rather than as it ran):

1. the engine trains every client and sets the server params to the FedAvg mean (for ``kd`` the engine
   behaves as ``avg``: broadcast, local training, server sgd on the mean delta); the student starts from
   that mean, so KD refines FedAvg rather than restarting from the previous round's server model;
2. the teacher is the mean, over all real clients, of the clients' heads evaluated on per-class
   generator features ``x`` -- computed ONCE per round (:func:`make_teacher`), one ``vmap`` over clients
   per batch, the client axis reduced at once so memory is one batch of activations per client;
3. the student distils BOTH branches (:func:`make_distill`): ``kd_training_epochs`` epochs of shuffled
   batches of ``batch_size`` rows, loss = sum over branches of the masked per-sample MSE to the teacher,
   optax AdamW at ``kd_learning_rate`` with each branch's adapter weight decay, a fresh optimiser each
   round (the distillation target changes every round);
4. a branch keeps its distilled params only if they lower its MSE to the teacher over the whole KD set
   (measured before and after); otherwise it keeps the mean. Why: when clients barely diverge the mean
   already sits at the teacher, and Adam's roughly fixed-size steps then move it away;
5. the result becomes the server params, broadcast at the start of the next round as FedAvg.

Where the reference differs: it distilled only the clip branch (an exception skipped
the t5 step, leaving the global t5 at its random init and overwriting clients' t5 every round), ignored
``kd_learning_rate``, recomputed teachers every epoch, and stepped persistent server optimisers.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from a2v_jax.config import Config
from a2v_jax.federated.local import branch_losses
from a2v_jax.types import Metrics, Params, PRNGKey


class KD(NamedTuple):
  """The two jitted stages of a KD round."""
  teacher: Callable[..., dict[str, jax.Array]]
  distill: Callable[..., tuple[Params, Metrics]]


def kd_optimizer(cfg: Config) -> optax.GradientTransformation:
  """AdamW(``kd_learning_rate``) per branch, with the branch's adapter weight decay."""
  lr = cfg.federation.kd_learning_rate
  txs = {b: optax.adamw(lr, weight_decay=getattr(cfg.train, f"{b}_adapter_weight_decay")) for b in cfg.branches}
  return optax.multi_transform(txs, lambda params: {k: k for k in params})


def make_teacher(apply_fn: Callable, batch_size: int) -> Callable:
  """Returns ``teacher(client_params, weights, x) -> {branch: (M, ...)}``.

  Args of the returned function:
    client_params: heads of every client, leading axis C.
    weights: (C,) non-negative; the teacher is ``sum_c w_c f_c(x) / sum_c w_c`` (uniform over real
      clients in the trainer: the reference averaged all clients, including those without class c).
    x: (M, T, D) generator features, M a multiple of ``batch_size``.
  """
  def teacher(client_params: Params, weights: jax.Array, x: jax.Array) -> dict[str, jax.Array]:
    w = weights.astype(jnp.float32)
    w = w / jnp.maximum(w.sum(), 1e-12)

    def one_batch(xb):
      outs = jax.vmap(apply_fn, in_axes=(0, None))(client_params, xb)  # {b: (C, B, ...)}
      return jax.tree.map(lambda o: jnp.tensordot(w, o.astype(jnp.float32), axes=(0, 0)), outs)

    out = jax.lax.map(one_batch, x.reshape((-1, batch_size) + x.shape[1:]))
    return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:]), out)

  return teacher


def make_distill(cfg: Config, apply_fn: Callable, batch_size: int) -> Callable:
  """Returns ``distill(params, x, mask, teacher, key) -> (params, metrics)``: the student's KD epochs.

  Args of the returned function:
    params: the student's starting heads (the round's FedAvg mean).
    x: (M, T, D) generator features, M a multiple of ``batch_size``.
    mask: (M,) 1 for real rows, 0 for padding (a batch without real rows changes nothing).
    teacher: {branch: (M, ...)} from :func:`make_teacher`.
    key: PRNG key of the epoch shuffles.

  Returns:
    (params, metrics): ``kd_{branch}_epoch_loss`` (E,) per-epoch means of the student's batch MSE to the
    teacher; ``kd_{branch}_loss_start`` / ``kd_{branch}_loss_end`` (scalars) the whole-set MSE of the
    starting and the distilled params; ``kd_{branch}_kept`` 1 when the distilled branch was kept.
  """
  tx = kd_optimizer(cfg)
  epochs = cfg.federation.kd_training_epochs

  def loss_fn(params, xb, tb, mb):
    losses = branch_losses(apply_fn(params, xb), tb, mb, 0.0)
    return sum(losses.values()), losses

  def set_losses(params, x, mask, teacher):
    """Masked whole-set MSE to the teacher per branch, batch by batch."""
    def one(args):
      xb, tb, mb = args
      return jax.tree.map(lambda l: l * mb.sum(), branch_losses(apply_fn(params, xb), tb, mb, 0.0))
    split = lambda a: a.reshape((-1, batch_size) + a.shape[1:])
    sums = jax.lax.map(one, (split(x), jax.tree.map(split, dict(teacher)), split(mask.astype(jnp.float32))))
    return {b: v.sum() / jnp.maximum(mask.sum(), 1.0) for b, v in sums.items()}

  def distill(params: Params, x: jax.Array, mask: jax.Array, teacher: Mapping[str, jax.Array],
              key: PRNGKey) -> tuple[Params, Metrics]:
    n = x.shape[0]
    steps = n // batch_size
    valid = mask > 0

    def one_epoch(carry, e):
      noise = jax.random.uniform(jax.random.fold_in(key, e), (n,))
      order = jnp.argsort(jnp.where(valid, noise, 2.0))  # real rows first, shuffled

      def one_step(carry, s):
        p, o = carry
        pos = jax.lax.dynamic_slice_in_dim(order, s * batch_size, batch_size)
        mb = mask[pos].astype(jnp.float32)
        tb = {b: t[pos] for b, t in teacher.items()}
        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x[pos], tb, mb)
        updates, new_o = tx.update(grads, o, p)
        has = mb.sum() > 0
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(has, a, b), new, old)
        return (keep(optax.apply_updates(p, updates), p), keep(new_o, o)), (losses, has)

      carry, (losses, has) = jax.lax.scan(one_step, carry, jnp.arange(steps))
      denom = jnp.maximum(has.sum(), 1)
      return carry, {b: jnp.sum(l * has) / denom for b, l in losses.items()}

    start = params
    (params, _), per_epoch = jax.lax.scan(one_epoch, (params, tx.init(params)), jnp.arange(epochs))
    before, after = set_losses(start, x, mask, teacher), set_losses(params, x, mask, teacher)
    kept = {b: after[b] < before[b] for b in before}
    params = {b: jax.tree.map(lambda n, o: jnp.where(kept[b], n, o), params[b], start[b]) for b in params}
    metrics = {}
    for b, v in per_epoch.items():
      metrics.update({f"kd_{b}_epoch_loss": v, f"kd_{b}_loss_start": before[b],
                      f"kd_{b}_loss_end": jnp.minimum(after[b], before[b]), f"kd_{b}_kept": kept[b].astype(jnp.float32)})
    return params, metrics

  return distill


def make_kd(cfg: Config, apply_fn: Callable, batch_size: int) -> KD:
  """Both KD stages, jitted once (shapes are fixed for a run: a second round compiles nothing)."""
  return KD(teacher=jax.jit(make_teacher(apply_fn, batch_size)),
            distill=jax.jit(make_distill(cfg, apply_fn, batch_size)))


def pad_rows(x: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """Host-side: pads (M, ...) rows with zeros to a multiple of ``multiple``; returns (x, mask)."""
  x = np.asarray(x)
  m = x.shape[0]
  size = max(multiple, -(-m // multiple) * multiple)
  out = np.zeros((size,) + x.shape[1:], x.dtype)
  out[:m] = x
  return out, (np.arange(size) < m).astype(np.float32)
