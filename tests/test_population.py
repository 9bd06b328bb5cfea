"""Rounds over a population held on the host: the cohort gathered, trained, written back; or stateless."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2v_jax.federated import engine, optim, population
from test_engine import _setup


def _data_fn(data):
  idx, count = np.asarray(data.idx), np.asarray(data.count)
  return lambda ids: (idx[ids], count[ids])


@pytest.mark.parametrize("mode, extra, on_disk", [("weighted", ['local_drift_correction="scaffold"'], False),
                                                   ("avg", [], True)])
def test_persistent_store_equals_the_in_memory_cohort_round(mode, extra, on_disk, tmp_path):
  """Population 3, cohort 2, three rounds: states gathered from (and written back to) a host store -- in RAM or
  memmap files -- give the numbers of the engine's cohort round on device states: server, every client."""
  cfg, alg, shared, data, lay = _setup(mode, ["join_ratio=0.67", *extra])
  server, clients = alg.init(jax.random.PRNGKey(3))
  store = population.ClientStore(clients, tmp_path / "store" if on_disk else None)
  pop = population.PopulationRound(alg, cfg, 3, 2, _data_fn(data), store)
  host_server = jax.tree.map(jnp.copy, server)
  step = jax.jit(alg.round)
  for _ in range(3):
    server, clients, metrics = step(server, clients, data, shared)
    host_server, host_metrics, ids = pop(host_server, shared, holders=int((np.asarray(data.count) > 0).sum()))
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(metrics["participate"])), ids)
    for x, y in zip(jax.tree.leaves(server), jax.tree.leaves(host_server)):
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-6, atol=1e-7)
    for x, y in zip(jax.tree.leaves(clients), store.arrays()):
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-6, atol=1e-7)
  if on_disk:
    assert sorted(p.name for p in (tmp_path / "store").iterdir())[0] == "leaf_000.npy"


def test_stateless_participants_start_from_the_global_model():
  """Stateless: every participant starts from the server params with a fresh optimiser state, whatever it did
  before; the new server model is FedAvg of those local runs (checked client by client); no store exists."""
  cfg, alg, shared, data, lay = _setup("avg", ["join_ratio=0.67"])
  server, _ = alg.init(jax.random.PRNGKey(4))
  pop = population.PopulationRound(alg, cfg, 3, 2, _data_fn(data), None)  # no store: stateless
  tx = optim.client_optimizer(cfg)
  for r in range(2):
    before = jax.tree.map(jnp.copy, server)
    server, _, ids = pop(server, shared)
    trained = []
    for c in ids:
      fresh = population.stateless_cohort(cfg, tx, before, jnp.asarray([c]))
      one = jax.tree.map(lambda x: x[0], fresh)
      out, _ = jax.jit(alg.local_train)(one, data.idx[c], data.count[c], before.round * cfg.train.local_epochs,
                                        shared)
      trained.append(out.params)
    mean = jax.tree.map(lambda *p: np.mean(np.stack([np.asarray(q, np.float64) for q in p]), 0), *trained)
    want, _ = engine.server_update(optim.server_optimizer(cfg), before, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), mean))
    for x, y in zip(jax.tree.leaves(server.params), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert pop.store is None


def test_population_arguments_are_checked():
  cfg, alg, shared, data, lay = _setup("avg")
  with pytest.raises(ValueError, match="client_state"):
    population.make_population_round(cfg, None, None, steps=1, population=3, cohort=2, data_fn=None,
                                     client_state="kept")
  with pytest.raises(ValueError, match="cohort 4"):
    population.make_population_round(cfg, None, None, steps=1, population=3, cohort=4, data_fn=None)
