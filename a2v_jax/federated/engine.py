"""The federated algorithm as a pair of pure functions, and the one place where clients are vmapped.

``fed_a2v(cfg, heads, ...)`` returns ``Algorithm(init, round)``:
  init(rng, num_clients) -> (ServerState, ClientState)
  round(server, clients, round_data, shared) -> (server, clients, metrics)
``round`` is jitted once per configuration: every client's local training is one vmapped call
(optionally in chunks of ``client_chunk_size`` clients via ``lax.map``), then FedAvg is a weighted
mean over the client axis followed by the server optimiser step. The client axis can be sharded
over a ``Mesh`` axis named ``'clients'`` (see ``sharding.py``); the code does not change.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from a2v_jax.config import Config
from a2v_jax.federated import aggregate, optim
from a2v_jax.federated.local import Shared, make_local_train
from a2v_jax.federated.state import ClientState, ServerState

BROADCAST_MODES = ("avg", "weighted", "kd", "centralised")


class RoundData(NamedTuple):
  """Per-client training data of a round: padded index arrays into the shared features."""
  idx: jax.Array     # (C, steps * B) int32
  count: jax.Array   # (C,) valid rows per client


class Algorithm(NamedTuple):
  init: Callable[..., tuple[ServerState, ClientState]]
  round: Callable[..., tuple[ServerState, ClientState, dict[str, Any]]]
  local_train: Callable  # single-client local training (for the looped reference backend)


def steps_per_epoch(max_count: int, batch_size: int) -> int:
  return max(1, math.ceil(max_count / batch_size))


def num_participants(cfg: Config, num_clients: int) -> int:
  return max(1, int(round(cfg.federation.join_ratio * num_clients)))


def fed_a2v(cfg: Config, apply_fn: Callable, init_fn: Callable, *, steps: int,
            num_clients: int) -> Algorithm:
  """Builds the FedA2V algorithm for a fixed configuration.

  Args:
    cfg: the run config.
    apply_fn: ``apply_fn(params, tokens (B, T, D)) -> {branch: output}``.
    init_fn: ``init_fn(rng) -> params`` of one node's heads.
    steps: local steps per epoch (from the largest client, see ``steps_per_epoch``).
    num_clients: C, the (possibly padded) client count.
  """
  tx = optim.client_optimizer(cfg)
  server_tx = optim.server_optimizer(cfg)
  mode = cfg.federation.adapter_aggregation_mode
  local_train = make_local_train(cfg, apply_fn, tx, cfg.train.batch_size, steps)
  chunk = cfg.federation.client_chunk_size
  m = num_participants(cfg, num_clients)

  def init(rng: jax.Array) -> tuple[ServerState, ClientState]:
    server_key, clients_key, rng = jax.random.split(rng, 3)
    server_params = init_fn(server_key)
    keys = jax.random.split(clients_key, num_clients)
    # Independent initialisation per node, as the reference; avg modes overwrite it in round 1.
    client_params = jax.vmap(init_fn)(keys)
    client_opt = jax.vmap(tx.init)(client_params)
    rngs = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    server = ServerState(params=server_params, opt_state=server_tx.init(server_params),
                         round=jnp.zeros((), jnp.int32), rng=rng)
    return server, ClientState(params=client_params, opt_state=client_opt, rng=rngs)

  def train_all(clients: ClientState, data: RoundData, epoch0, shared: Shared):
    fn = lambda c, i, n: local_train(c, i, n, epoch0, shared)
    if chunk is None or chunk >= num_clients:
      return jax.vmap(fn)(clients, data.idx, data.count)
    return jax.lax.map(lambda args: fn(*args), (clients, data.idx, data.count), batch_size=chunk)

  def round_fn(server: ServerState, clients: ClientState, data: RoundData, shared: Shared):
    chex.assert_axis_dimension(data.idx, 0, num_clients)
    chex.assert_axis_dimension(data.count, 0, num_clients)
    rng, pick_key = jax.random.split(server.rng)
    if m < num_clients:
      chosen = jax.random.permutation(pick_key, num_clients)[:m]
      participate = jnp.zeros((num_clients,), bool).at[chosen].set(True)
    else:
      participate = jnp.ones((num_clients,), bool)
    participate = participate & (data.count > 0)
    if mode in BROADCAST_MODES:
      global_params = aggregate.broadcast(server.params, num_clients)
      clients = clients.replace(params=aggregate.select(participate, global_params, clients.params))
    epoch0 = server.round * cfg.train.local_epochs
    trained, metrics = train_all(clients, data, epoch0, shared)
    clients = jax.tree.map(lambda n, o: aggregate.select(participate, n, o), trained, clients)
    weights = aggregate.client_weights(mode, data.count, participate)
    mean = aggregate.weighted_mean(clients.params, weights)
    if mode in BROADCAST_MODES:
      pseudo_grad = jax.tree.map(lambda g, mu: g - mu, server.params, mean)
      updates, opt_state = server_tx.update(pseudo_grad, server.opt_state, server.params)
      params = optax.apply_updates(server.params, updates)
    else:  # local-only: no server model; keep the mean only as a reference point
      params, opt_state = mean, server.opt_state
    server = server.replace(params=params, opt_state=opt_state, round=server.round + 1, rng=rng)
    metrics = dict(metrics, participate=participate)
    return server, clients, metrics

  return Algorithm(init=init, round=round_fn, local_train=local_train)


def jit_round(alg: Algorithm, sharding: Optional[Any] = None) -> Callable:
  """Jits ``alg.round`` once, donating the server and client buffers."""
  del sharding  # placement comes from the inputs' shardings (see sharding.py)
  return jax.jit(alg.round, donate_argnums=(0, 1))
