"""Differential privacy: DP-SGD inside a node's local training, and its accounting with Google's dp-accounting.

Record-level DP (``dp_level: "record"``, cross-silo: an institution's clips are the records). Every local step of a
node: the gradient of every example of the batch (``jax.vmap`` of ``jax.grad`` over the rows), each clipped to L2
norm ``dp_l2_clip`` over all its parameters, padding rows dropped, summed, Gaussian noise of std
``dp_noise_multiplier * dp_l2_clip`` added to every coordinate of the sum, divided by the batch size (the expected
lot size). All inside the one compiled round; the noise comes from the node's own key, so nodes draw independent
noise and a resumed run draws the same. Written here rather than with optax's ``differentially_private_aggregate``:
that transformation keeps one seed in the optimiser state, shared by every client that starts from it (identical
noise on every node), and cannot drop the padding rows of a smaller node's last batch.

Accounting. A node with n train rows and batch B takes ceil(n / B) steps per local epoch over a shuffled
partition of its rows; as Opacus and TF Privacy do, each step is accounted as a Poisson-sampled Gaussian mechanism
with rate q = B / n (``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``), composed over every step the node took
in the rounds it was sampled for, and epsilon at ``dp_delta`` comes from the PLD accountant (RDP cross-checks it in
the tests). Everything else a node sends is a function of these noisy gradients (post-processing): the heads the
server averages inherit the guarantee. What is NOT covered: the synthetic features of Run 2 (generators trained on
real audio without DP) and the per-class mean features of server global training; such runs are refused with DP.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.errors import A2VError

NOISE_CAP = 1000.0  # the largest noise multiplier a target epsilon is calibrated within
NOISE_SALT = 0xD9  # fold_in salt of a local epoch's DP noise key (from its shuffle key)
NODE_SALT = 0xDA  # fold_in salt of node-level DP's noise key (from the server's key of the round)


class PrivacyError(A2VError, ValueError):
  """A DP setting that cannot be honoured (an unreachable target epsilon, ...)."""


def clipped_noisy_sum(per_example: Any, mask: jax.Array, clip: float, noise_multiplier: float,
                      key: jax.Array) -> tuple[Any, jax.Array]:
  """sum_i mask_i * g_i * min(1, clip / ||g_i||) + N(0, (noise_multiplier * clip)^2 I), and the norms ||g_i||.

  ``per_example``: a pytree whose leaves have a leading example axis (B, ...); ``mask`` (B,) marks real rows.
  """
  leaves, treedef = jax.tree.flatten(per_example)
  sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in leaves)
  norms = jnp.sqrt(sq)
  scale = mask.astype(jnp.float32) * jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-12))
  keys = jax.random.split(key, len(leaves))
  out = [(jnp.tensordot(scale, x.astype(jnp.float32), axes=(0, 0))
          + noise_multiplier * clip * jax.random.normal(k, x.shape[1:], jnp.float32)).astype(x.dtype)
         for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, out), norms


def dp_mean_update(global_params: Any, trained: Any, part: jax.Array, clip: jax.Array, noise_multiplier: float,
                   expected: int, key: jax.Array) -> tuple[Any, jax.Array]:
  """Node-level DP-FedAvg's new mean: global + (sum of the participants' updates, each clipped to ``clip``, plus
  Gaussian noise of std ``noise_multiplier * clip``) / ``expected`` (the cohort size m, fixed: a data-independent
  denominator). Returns (the mean, each participant's update norm)."""
  deltas = jax.tree.map(lambda t, g: t - g[None], trained, global_params)
  summed, norms = clipped_noisy_sum(deltas, part, clip, noise_multiplier, key)
  return jax.tree.map(lambda g, s: g + s / expected, global_params, summed), norms


def adaptive_clip(clip: jax.Array, norms: jax.Array, part: jax.Array, expected: int, quantile: float, lr: float,
                  count_stddev: float, key: jax.Array) -> jax.Array:
  """Andrew et al. (2021), quantile tracking: the share of participants whose update fits the clip, released with
  Gaussian noise of std ``count_stddev`` on the count, moves the clip geometrically towards that quantile:
  C <- C exp(-lr (b - quantile)), b = (#{||d_i|| <= C} + N(0, count_stddev^2)) / m."""
  fits = jnp.sum(part.astype(jnp.float32) * (norms <= clip).astype(jnp.float32))
  b = (fits + count_stddev * jax.random.normal(key, ())) / expected
  return clip * jnp.exp(-lr * (b - quantile))


def update_noise_multiplier(total: float, count_stddev: float, expected: int) -> float:
  """The update's noise multiplier when the clipped count takes part of the budget (Andrew et al., Thm 1):
  z_update = (z^-2 - (2 count_stddev)^-2)^(-1/2), so the pair is accounted as ONE Gaussian of multiplier z (the
  count has sensitivity 1, the clipped sum sensitivity C).

  Raises:
    PrivacyError: the count's noise is too small for the total (nothing left for the update).
  """
  rest = total ** -2 - (2 * count_stddev) ** -2
  if rest <= 0:
    raise PrivacyError(f"adaptive clipping: the clipped count's noise ({count_stddev:g} for a cohort of {expected}) "
                       f"leaves no budget for noise multiplier {total:g}; raise dp_clipped_count_stddev")
  return rest ** -0.5


def dp_event(sampling_rate: float, noise_multiplier: float, steps: int):
  """The dp-accounting event of ``steps`` Poisson-sampled Gaussian steps."""
  import dp_accounting as dpa
  return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier)),
                                 int(steps))


PLD_MAX_EPSILON = 30.0  # above this (RDP's bound), the PLD grid grows to tens of GB: RDP's bound is reported


@functools.lru_cache(maxsize=4096)
def epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "pld") -> float:
  """Epsilon at ``delta`` after ``steps`` Poisson-sampled Gaussian steps (0 when no step was taken).

  PLD (the tight one) unless RDP's upper bound is above ``PLD_MAX_EPSILON``: there the guarantee is weak anyway and
  the PLD's discretised loss grid would need tens of GB (measured: 27 GB at noise 0.3 over 20,000 steps), so the
  RDP bound -- valid, a little looser -- is returned.
  """
  return composed_epsilon(((sampling_rate, noise_multiplier, steps),), delta, accountant)


@functools.lru_cache(maxsize=4096)
def composed_epsilon(groups: tuple[tuple[float, float, int], ...], delta: float, accountant: str = "pld") -> float:
  """Epsilon at ``delta`` of groups of Poisson-sampled Gaussian steps ``(rate, noise multiplier, steps)`` applied one
  after another to the same records (e.g. a node's generators in Run 1, then its heads in Run 2)."""
  events = [dp_event(min(1.0, q), z, s) for q, z, s in groups if s > 0]
  if not events:
    return 0.0
  import logging
  import dp_accounting as dpa
  from dp_accounting import pld, rdp
  event = events[0] if len(events) == 1 else dpa.ComposedDpEvent(events)
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)  # RDP's per-order convergence notes (orders it drops) are not the user's business
  try:
    bound = rdp.RdpAccountant().compose(event).get_epsilon(delta)
  finally:
    absl.setLevel(level)
  if accountant == "rdp" or bound > PLD_MAX_EPSILON:
    return float(bound)
  return float(pld.PLDAccountant().compose(event).get_epsilon(delta))


def calibrate(target_epsilon: float, sampling_rates: list[float], steps: list[int], delta: float,
              worst: Optional[Callable[..., float]] = None) -> float:
  """The smallest noise multiplier (to 1e-4 relative) whose worst node spends at most ``target_epsilon`` over
  ``steps`` (``worst(z, accountant)``: that epsilon by "pld" or "rdp", when it is not
  ``max_i epsilon(rate_i, z, steps_i)``).

  RDP first (milliseconds an evaluation) brackets the answer: its bound is above PLD's, so its noise is enough; a
  PLD bisection then searches below it (0.27 s an evaluation at these sizes: 40 PLD halvings took 32 s).

  Raises:
    PrivacyError: no noise multiplier up to ``NOISE_CAP`` reaches it.
  """
  if worst is None:
    worst = lambda z, accountant="pld": max(epsilon(q, z, s, delta, accountant) for q, s in zip(sampling_rates, steps))
  if worst(NOISE_CAP) > target_epsilon:
    raise PrivacyError(f"config key 'dp_target_epsilon' {target_epsilon} is out of reach: even noise multiplier "
                       f"{NOISE_CAP:g} spends {worst(NOISE_CAP):.3g} over the configured rounds at delta {delta:g}; "
                       "raise it, or run fewer rounds / local epochs")

  def bisect(lo: float, hi: float, accountant: str) -> float:
    """The bracket's feasible end once it is 1e-4 wide (worst(hi) <= target < worst(lo)): regula falsi on
    (log z, log epsilon) with the Illinois step (a handful of evaluations: epsilon is smooth and monotone in z);
    once the feasible end is within 1e-5 of the target, one probe 1e-4 below it closes the bracket."""
    f = lambda z: math.log(max(worst(z, accountant), 1e-300)) - math.log(target_epsilon)
    a, b, fa, fb, side = math.log(lo), math.log(hi), f(lo), f(hi), 0
    while b - a > 1e-4:
      m = (a + b) / 2 if not (math.isfinite(fa) and math.isfinite(fb)) or fa == fb else b - fb * (b - a) / (fb - fa)
      m = min(max(m, a + 1e-5), b - 1e-5)
      fm = f(math.exp(m))
      if fm > 0:
        a, fa = m, fm
        fb, side = (fb / 2, side) if side == 1 else (fb, 1)  # Illinois: halve the stale end's value
      else:
        b, fb = m, fm
        fa, side = (fa / 2, side) if side == -1 else (fa, -1)
      if fm <= 0 and fm > -1e-5 and b - a > 1e-4:  # epsilon within 1e-5 of the target from below: probe the gap
        fa2 = f(math.exp(b - 1e-4))
        if fa2 > 0:
          a, fa = b - 1e-4, fa2
    return math.exp(b)

  rdp_z = bisect(1e-3, NOISE_CAP, "rdp") if worst(NOISE_CAP, "rdp") <= target_epsilon else NOISE_CAP
  if worst(rdp_z) > target_epsilon:  # PLD above RDP (not expected): search above the RDP answer
    return bisect(rdp_z, NOISE_CAP, "pld")
  lo = rdp_z / 4
  while lo > 1e-3 and worst(lo) <= target_epsilon:
    lo /= 4
  return bisect(max(lo, 1e-3), rdp_z, "pld") if worst(max(lo, 1e-3)) > target_epsilon else max(lo, 1e-3)


class RecordAccountant:
  """Per-node spent epsilon of record-level DP: node i steps ``steps_per_round[i]`` times in each round it is
  sampled for, at rate ``rates[i]``. ``prior[i]``: what node i's records spent before this run, per generator key
  (Run 2 after a DP Run 1: the generators' step groups); a record of key k spent its key's groups, then this run's
  steps, so node i's epsilon is the largest over its keys of the composition."""

  def __init__(self, rates: np.ndarray, steps_per_round: np.ndarray, noise_multiplier: float, delta: float,
               prior: Optional[list[list[tuple[float, float, int]]]] = None):
    self.rates, self.steps_per_round = np.asarray(rates, float), np.asarray(steps_per_round, int)
    self.noise_multiplier, self.delta = float(noise_multiplier), float(delta)
    self.steps = np.zeros(len(self.rates), int)
    self.prior = prior

  def node_epsilon(self, i: int, steps: int, noise_multiplier: Optional[float] = None,
                   accountant: str = "pld") -> float:
    z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
    own = (round(float(self.rates[i]), 12), z, int(steps))
    keys = self.prior[i] if self.prior is not None and i < len(self.prior) and self.prior[i] else [None]
    return max(composed_epsilon(((k,) if k is not None else ()) + (own,), self.delta, accountant) for k in keys)

  def record(self, participate: np.ndarray) -> None:
    self.steps += np.asarray(participate, bool)[:len(self.steps)] * self.steps_per_round

  def epsilons(self) -> np.ndarray:
    return np.array([self.node_epsilon(i, s) for i, s in enumerate(self.steps)])

  def restore(self, row: dict) -> None:
    """The steps spent up to a resumed round, from its logged row."""
    self.steps = np.array([int(row.get(f"privacy/node_{i}/dp_steps", 0)) for i in range(len(self.steps))])

  def summary(self, cfg: Any) -> dict[str, Any]:
    eps = self.epsilons()
    return {"level": "record", "l2_clip": cfg.privacy.dp_l2_clip, "noise_multiplier": self.noise_multiplier,
            "delta": self.delta, "accountant": "PLD (dp-accounting), Poisson-sampled Gaussian steps"
            + ("; composed with the generators' DP-SGD of Run 1 (worst generator key per node)" if self.prior else ""),
            "epsilon_per_node": [float(e) for e in eps], "epsilon_max": float(eps.max()) if len(eps) else 0.0,
            "dp_steps_per_node": [int(s) for s in self.steps], "rates": [float(q) for q in self.rates]}

  def row(self) -> dict[str, float]:
    eps = self.epsilons()
    row = {f"privacy/node_{i}/epsilon": float(e) for i, e in enumerate(eps)}
    row.update({f"privacy/node_{i}/dp_steps": int(s) for i, s in enumerate(self.steps)})
    row["privacy/epsilon_max"] = float(eps.max()) if len(eps) else 0.0
    return row


class NodeAccountant:
  """Population-level epsilon of node-level DP-FedAvg: one Poisson-sampled Gaussian per round at rate m / C."""

  def __init__(self, rate: float, noise_multiplier: float, delta: float):
    self.rate, self.noise_multiplier, self.delta = float(rate), float(noise_multiplier), float(delta)
    self.rounds = 0

  def record(self, participate: np.ndarray) -> None:
    self.rounds += 1  # the server's release happens every round, whoever was sampled

  def restore(self, row: dict) -> None:
    self.rounds = int(row.get("privacy/dp_rounds", 0))

  def row(self) -> dict[str, float]:
    return {"privacy/epsilon": epsilon(round(self.rate, 12), self.noise_multiplier, self.rounds, self.delta),
            "privacy/dp_rounds": self.rounds}

  def summary(self, cfg: Any) -> dict[str, Any]:
    return {"level": "node", "l2_clip": cfg.privacy.dp_l2_clip, "adaptive_clip": cfg.privacy.dp_adaptive_clip,
            "noise_multiplier": self.noise_multiplier, "delta": self.delta, "sampling_rate": self.rate,
            "accountant": "PLD (dp-accounting), one Poisson-sampled Gaussian per round", "rounds": self.rounds,
            "epsilon": self.row()["privacy/epsilon"]}


class GeneratorAccountant:
  """Record-level epsilon of each node's generators (DP-SGD in a generator-only Run 1).

  ``counts[i, k]``: node i's train rows of generator key k (a class, a group, or all). Every round each such cell
  trains ``epochs`` epochs of ceil(n / B) DP steps at rate B / n, whether its generator is the node's own or shared
  (a shared generator's visit by node i touches only node i's rows). A node's keys hold disjoint rows, so by
  parallel composition its epsilon is the largest over its keys. Stateless: epsilon after r rounds is a function
  of r, so a resumed Run 1 states the same numbers.
  """

  def __init__(self, counts: np.ndarray, batch_size: int, epochs: int, noise_multiplier: float, delta: float,
               clip: float):
    self.counts = np.asarray(counts, np.int64)
    self.rates = np.minimum(1.0, batch_size / np.maximum(self.counts, 1))
    self.steps_per_round = epochs * np.ceil(self.counts / batch_size).astype(np.int64) * (self.counts > 0)
    self.noise_multiplier, self.delta, self.clip = float(noise_multiplier), float(delta), float(clip)

  @staticmethod
  def groups(record: dict) -> list[list[tuple[float, float, int]]]:
    """Per node, per key with rows: the (rate, noise, steps) group a checkpoint's ``record`` says was spent."""
    z, r = float(record["noise_multiplier"]), int(record["rounds"])
    return [[(round(float(q), 12), z, int(s) * r) for q, s in zip(qs, ss) if s]
            for qs, ss in zip(record["rates"], record["dp_steps_per_round"])]

  def epsilons(self, rounds: int) -> np.ndarray:
    """(nodes,) epsilon of each node's generators after ``rounds`` rounds."""
    cells = [[epsilon(round(float(q), 12), self.noise_multiplier, int(s) * rounds, self.delta) if s else 0.0
              for q, s in zip(qs, ss)] for qs, ss in zip(self.rates, self.steps_per_round)]
    return np.array([max(c, default=0.0) for c in cells])

  def record(self, rounds: int) -> dict[str, Any]:
    """What a generator checkpoint's manifest and the run's summary state about the guarantee."""
    eps = self.epsilons(rounds)
    return {"level": "record", "epsilon_per_node": [float(e) for e in eps], "epsilon_max": float(eps.max()),
            "delta": self.delta, "noise_multiplier": self.noise_multiplier, "l2_clip": self.clip, "rounds": rounds,
            "dp_steps_per_round": self.steps_per_round.tolist(), "rates": self.rates.tolist(),
            "accountant": "PLD (dp-accounting), Poisson-sampled Gaussian steps; max over a node's generator keys"}

  def row(self, rounds: int) -> dict[str, float]:
    eps = self.epsilons(rounds)
    row = {f"privacy/node_{i}/epsilon": float(e) for i, e in enumerate(eps)}
    row["privacy/epsilon_max"] = float(eps.max())
    return row


def per_example_grads(loss_fn: Callable, params: Any, *args) -> tuple[Any, Any]:
  """(grads with a leading example axis, per-example aux) of ``loss_fn(params, *example) -> (loss, aux)`` over
  the leading axis of every array in ``args``."""
  return jax.vmap(jax.grad(loss_fn, has_aux=True), in_axes=(None,) + (0,) * len(args))(params, *args)


def dp_delta(delta: Optional[float], records: int) -> float:
  """``dp_delta``, or 1 / records^1.1 (below 1 / n, the usual requirement) when unset."""
  return float(delta) if delta is not None else 1.0 / max(records, 2) ** 1.1
