"""The server of a deployment: the simulation's sampling, aggregation and server step, on replies from nodes.

Everything numeric comes from the engine (``engine.sample_participants``, ``aggregate.client_weights`` /
``weighted_mean``, ``engine.server_update``) and is initialised key for key as ``engine.fed_a2v(...).init``
does, so a deployment's server model equals the vmapped engine's (within float rounding of the clients'
single-client programs). The server never sees a node's rows: it evaluates by asking every node for its
metrics on its own split and combines them weighted by the node's row count -- every metric is a mean over
rows (``metrics.branch_metrics``), so the combination is the engine's metric on the union of the splits.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax import checkpoint as ckpt_lib
from a2v_jax.config import Config
from a2v_jax.deploy.node import SPLITS, DeploymentError, agreed_config
from a2v_jax.federated import aggregate, engine, optim
from a2v_jax.federated.state import ServerState
from a2v_jax.models.heads import head_functions, make_heads
from a2v_jax.types import Params

# What a deployment runs; the other modes need every client's state on the server (none, centralised),
# generators on the server (kd) or a second quantity per client (scaffold's control variates).
DEPLOYABLE_MODES = ("avg", "weighted")
DEPLOYABLE_CORRECTIONS = ("none", "fedprox")


def check_deployable(cfg: Config) -> None:
  """Refuses, naming the key, what a deployment does not run."""
  f = cfg.federation
  if f.adapter_aggregation_mode not in DEPLOYABLE_MODES:
    raise DeploymentError(f"config key 'adapter_aggregation_mode' is {f.adapter_aggregation_mode!r}; a deployment "
                          f"runs {' or '.join(DEPLOYABLE_MODES)} (the simulation runs every mode)")
  if f.local_drift_correction not in DEPLOYABLE_CORRECTIONS:
    raise DeploymentError(f"config key 'local_drift_correction' is {f.local_drift_correction!r}; a deployment runs "
                          f"{' or '.join(DEPLOYABLE_CORRECTIONS)}")
  g = cfg.generators
  if g.use_generator or g.use_pretrained_generators:
    raise DeploymentError("a deployment trains heads only: set use_generator and use_pretrained_generators to false")
  if f.client_state != "persistent":
    raise DeploymentError(f"config key 'client_state' is {f.client_state!r}; a deployed node keeps its state "
                          "between rounds ('persistent'; the simulation runs both)")
  if cfg.privacy.dp_level is not None:
    raise DeploymentError(f"config key 'dp_level' is {cfg.privacy.dp_level!r}; a deployment does not run DP yet (the "
                          "simulation does): drop the dp_* keys")


def check_nodes(cfg: Config, descriptions: Sequence[Mapping[str, Any]]) -> None:
  """Every node of the partition answered once, with the server's config, shapes and classes.

  Raises:
    DeploymentError: one line per problem, naming the node and the difference.
  """
  want = cfg.data.num_nodes
  ids = sorted(int(d["node_id"]) for d in descriptions)
  if ids != list(range(want)):
    raise DeploymentError(f"the server expects nodes 0..{want - 1} (num_nodes={want}), these answered: {ids}")
  mine = agreed_config(cfg)
  problems = []
  first = descriptions[0]
  for d in sorted(descriptions, key=lambda d: int(d["node_id"])):
    n = d["node_id"]
    problems += [f"node {n}: {x}" for x in ckpt_lib.config_differences(d["config"], mine, ("node", "server"))]
    for k in ("token_shape", "target_shapes", "class_names", "num_nodes"):
      if d[k] != first[k]:
        problems.append(f"node {n}: {k} {d[k]} vs node {first['node_id']}'s {first[k]}")
    theirs, ours = d.get("backbones") or {}, first.get("backbones") or {}
    other = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if other:
      problems.append(f"node {n}: other encoder weights than node {first['node_id']} ({', '.join(other)}: content "
                      f"fingerprint {[theirs.get(k) for k in other]} vs {[ours.get(k) for k in other]})")
  if problems:
    raise DeploymentError("nodes disagree with the server's config:\n  " + "\n  ".join(problems))


class ServerProgram:
  """The server's state and its per-round steps; the transport (Flower, or a loop in one process) calls it."""

  def __init__(self, cfg: Config, descriptions: Sequence[Mapping[str, Any]]):
    check_deployable(cfg)
    check_nodes(cfg, descriptions)
    self.cfg = cfg
    by_id = sorted(descriptions, key=lambda d: int(d["node_id"]))
    self.num_nodes = len(by_id)
    self.train_count = np.asarray([d["train_count"] for d in by_id], np.int32)
    self.split_count = {s: np.asarray([d[f"{s}_count"] for d in by_id], np.int32) for s in SPLITS}
    empty = np.flatnonzero(self.train_count == 0)
    if empty.size:
      raise DeploymentError(f"node(s) {empty.tolist()} have no training clips; change the partition")
    self.steps = engine.steps_per_epoch(int(self.train_count.max()), cfg.train.batch_size)
    heads = make_heads(cfg, {b: tuple(s) for b, s in by_id[0]["target_shapes"].items()})
    _, self.init_fn = head_functions(heads, tuple(by_id[0]["token_shape"]))
    self.participants = engine.num_participants(cfg, self.num_nodes)
    server_tx = optim.server_optimizer(cfg)
    mode = cfg.federation.adapter_aggregation_mode

    server_key, _, rng = engine.init_keys(jax.random.PRNGKey(cfg.experiment.seed), self.num_nodes)
    self.state = engine.init_server(cfg, self.init_fn, server_tx, server_key, rng)

    def update(server: ServerState, mean: Params):
      params, opt_state = engine.server_update(server_tx, server, mean)
      return server.replace(params=params, opt_state=opt_state, round=server.round + 1)

    def step(server: ServerState, stacked: Params, participate: jax.Array):
      return update(server, aggregate.weighted_mean(stacked, aggregate.client_weights(
          mode, jnp.asarray(self.train_count), participate)))

    self._step, self._update = jax.jit(step), jax.jit(update)
    self._sample = jax.jit(lambda rng: engine.sample_participants(rng, self.num_nodes, self.participants,
                                                                  jnp.asarray(self.train_count)))

  @property
  def params(self) -> Params:
    return self.state.params

  def sample(self) -> np.ndarray:
    """This round's participants (C,) bool; advances the server's key as the engine's round does."""
    rng, participate = self._sample(self.state.rng)
    self.state = self.state.replace(rng=rng)
    return np.asarray(participate)

  def round_config(self) -> dict[str, int]:
    """What every participant needs besides the global heads."""
    return {"server_round": int(self.state.round), "steps": int(self.steps)}

  def aggregate(self, replies: Mapping[int, Params], participate: np.ndarray) -> np.ndarray:
    """The server step on the participants' params; returns the participation that counted (a sampled node
    without a reply counts as not sampled)."""
    counted = np.asarray([bool(participate[i]) and i in replies for i in range(self.num_nodes)])
    zeros = jax.tree.map(jnp.zeros_like, self.state.params)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[replies[i] if counted[i] else zeros for i in range(self.num_nodes)])
    self.state = self._step(self.state, stacked, jnp.asarray(counted))
    return counted

  def apply_mean(self, mean: Params) -> None:
    """The server step on a mean aggregated elsewhere (SecAgg+ gives only the participants' weighted mean)."""
    self.state = self._update(self.state, jax.tree.map(jnp.asarray, mean))

  def train_row(self, metrics: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """``train/node_{i}/{branch}_loss`` of every node, 0.0 for a node that did not train (as the engine logs)."""
    keys = list(next(iter(metrics.values()), {}))
    return {f"train/node_{i}/{k}": float(metrics.get(i, {}).get(k, 0.0)) for k in keys for i in range(self.num_nodes)}

  def eval_row(self, server_metrics: Mapping[int, Mapping[str, tuple[dict, int]]],
               node_metrics: Mapping[int, Mapping[str, tuple[dict, int]]]) -> dict[str, float]:
    """The engine's ``test/server/*`` (the count-weighted mean over nodes) and ``test/node_{i}/*`` rows.

    ``server_metrics[i][split]`` = (metrics of the global heads on node i's split, its row count);
    ``node_metrics[i][split]`` = the same for node i's own heads.
    """
    row: dict[str, float] = {}
    for split in SPLITS:
      parts = [server_metrics[i][split] for i in sorted(server_metrics) if server_metrics[i][split][1] > 0]
      total = sum(n for _, n in parts)
      if total == 0:
        continue
      for k in parts[0][0]:
        row[f"test/server/{k}_on_{split}"] = float(sum(np.float64(m[k]) * n for m, n in parts) / total)
      for i in sorted(node_metrics):
        m, n = node_metrics[i][split]
        for k, v in m.items():
          if n > 0:
            row[f"test/node_{i}/{k}_on_{split}"] = float(v)
    return row


def wants_eval(cfg: Config, round_: int) -> bool:
  """The engine's evaluation rounds: every ``eval_gap`` and the last."""
  gap, last = cfg.federation.eval_gap, cfg.federation.global_rounds
  return bool(gap) and (round_ % gap == 0 or round_ == last)

