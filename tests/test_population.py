"""Rounds over a population held on the host: the cohort gathered, trained, written back; or stateless."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2v_jax.federated import engine, optim, population
from test_engine import _setup


def _data_fn(data):
  idx, count = np.asarray(data.idx), np.asarray(data.count)
  return lambda ids: (idx[ids], count[ids])


@pytest.mark.parametrize("mode, extra, on_disk, flush_each_round", [
    ("weighted", ['local_drift_correction="scaffold"'], False, False), ("avg", [], True, False),
    ("avg", [], False, True)])
def test_persistent_store_equals_the_in_memory_cohort_round(mode, extra, on_disk, flush_each_round, tmp_path):
  """Population 3, cohort 2, three rounds: states gathered from (and written back to) a host store -- in RAM or
  memmap files, pipelined (the next cohort gathered while a round trains, its rows the round trains patched from
  the result) or flushed every round -- give the numbers of the engine's cohort round on device states: server,
  every client."""
  cfg, alg, shared, data, lay = _setup(mode, ["join_ratio=0.67", *extra])
  server, clients = alg.init(jax.random.PRNGKey(3))
  store = population.ClientStore(clients, tmp_path / "store" if on_disk else None)
  pop = population.PopulationRound(alg, cfg, 3, 2, _data_fn(data), store)
  host_server = jax.tree.map(jnp.copy, server)
  step = jax.jit(alg.round)
  def same_clients():
    pop.flush()
    for x, y in zip(jax.tree.leaves(clients), store.arrays()):
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-6, atol=1e-7)

  for _ in range(4):  # 2 of 3 each round: consecutive cohorts always share a client (the patched rows)
    server, clients, metrics = step(server, clients, data, shared)
    host_server, host_metrics, ids = pop(host_server, shared, holders=int((np.asarray(data.count) > 0).sum()))
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(metrics["participate"])), ids)
    for x, y in zip(jax.tree.leaves(server), jax.tree.leaves(host_server)):
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-6, atol=1e-7)
    if flush_each_round:
      same_clients()
  same_clients()
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
      fresh = engine.fresh_clients(cfg, tx, before, jnp.asarray([c]))
      one = jax.tree.map(lambda x: x[0], fresh)
      out, _ = jax.jit(alg.local_train)(one, data.idx[c], data.count[c], before.round * cfg.train.local_epochs,
                                        shared)
      trained.append(out.params)
    mean = jax.tree.map(lambda *p: np.mean(np.stack([np.asarray(q, np.float64) for q in p]), 0), *trained)
    want, _ = engine.server_update(optim.server_optimizer(cfg), before, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), mean))
    for x, y in zip(jax.tree.leaves(server.params), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert pop.store is None


@pytest.mark.parametrize("join", ["0.67", "1.0"])
def test_run_key_client_state_stateless_is_the_population_round(join):
  """``client_state: stateless`` in a run's config: the engine's round (cohort gathered on the device at join 0.67,
  the full program at 1.0) gives the numbers of the population round that builds its participants from nothing;
  and it is not the persistent run (from round 2 on a participant's AdamW moments would survive)."""
  cfg, alg, shared, data, lay = _setup("avg", [f"join_ratio={join}", 'client_state="stateless"'])
  _, persistent, *_ = _setup("avg", [f"join_ratio={join}"])
  server, clients = alg.init(jax.random.PRNGKey(5))
  pop = population.PopulationRound(alg, cfg, 3, round(float(join) * 3), _data_fn(data), None)
  host, kept = jax.tree.map(jnp.copy, server), (jax.tree.map(jnp.copy, server), jax.tree.map(jnp.copy, clients))
  step, kept_step = jax.jit(alg.round), jax.jit(persistent.round)
  for _ in range(3):
    server, clients, metrics = step(server, clients, data, shared)
    host, host_metrics, ids = pop(host, shared)
    kept = kept_step(*kept, data, shared)[:2]
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(metrics["participate"])), ids)
    for x, y in zip(jax.tree.leaves(server), jax.tree.leaves(host)):
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=2e-6, atol=1e-7)
  gap = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for x, y in zip(jax.tree.leaves(server.params), jax.tree.leaves(kept[0].params)))
  assert gap > 1e-4


def test_client_state_refusals():
  from a2v_jax import config
  for overrides, msg in ((['client_state="kept"'], "client_state"),
                         (['client_state="stateless"', 'adapter_aggregation_mode="none"'], "no global model"),
                         (['client_state="stateless"', 'local_drift_correction="scaffold"'], "SCAFFOLD")):
    with pytest.raises(config.ConfigError, match=msg):
      config.load(None, overrides)


def test_population_arguments_are_checked():
  cfg, alg, shared, data, lay = _setup("avg")
  with pytest.raises(ValueError, match="client_state"):
    population.make_population_round(cfg, None, None, steps=1, population=3, cohort=2, data_fn=None,
                                     client_state="kept")
  with pytest.raises(ValueError, match="cohort 4"):
    population.make_population_round(cfg, None, None, steps=1, population=3, cohort=4, data_fn=None)


def test_scaling_population_runner_equals_the_full_program_and_draws_rows_on_demand():
  """``experiments.scaling --population C --cohort C --client-state persistent`` is the full-participation round
  of C clients, number for number; a client's rows are the same function of its id in both."""
  from a2v_jax import config
  from experiments.scalestudy.runners import JaxRunner, PopulationRunner
  from experiments.scalestudy.workload import Workload, client_rows, synthetic_data
  cfg = config.load(None, ["clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2", "batch_size=2",
                           "local_epochs=1", 'server_optimizer="sgd"', "server_learning_rate=1.0",
                           "server_momentum=0.0", 'local_drift_correction="none"'])
  w = Workload(num_clients=4, samples_per_client=4, batch_size=2, local_epochs=1, tokens=5, feature_dim=8,
               target_shapes={"clip": (4,), "t5": (3, 6)})
  data = synthetic_data(w)
  np.testing.assert_array_equal(data.rows[[2, 3]], client_rows(w, np.array([2, 3])))
  full = JaxRunner(cfg, w, data, budget=1 << 34)
  pop = PopulationRunner(cfg, w, 4, synthetic_data(w, with_rows=False), client_state="persistent")
  for run in (full, pop):
    run.setup()
    for r in range(2):
      run.round(r)
  for x, y in zip(jax.tree.leaves(full.server), jax.tree.leaves(pop.server)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-6, atol=1e-7)
  pop.pop.flush()
  for x, y in zip(jax.tree.leaves(full.clients), pop.pop.store.arrays()):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-6, atol=1e-7)


def test_scaling_cli_population_arguments(capsys):
  from experiments.scaling import parse_args
  for argv, msg in ((["--cohort", "10"], "--population and --cohort go together"),
                    (["--population", "100", "--cohort", "1000"], "larger than the population"),
                    (["--client-state", "persistent"], "apply to --population runs")):
    with pytest.raises(SystemExit) as e:
      parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_a_killed_population_run_resumes_bit_for_bit(tmp_path):
  """Persistent memmap store, four rounds with a checkpoint after each; a second process-like start (new store,
  new round object) restores round 2 -- round 4's checkpoint damaged, round 3's never finished -- and its rounds
  3-4 equal the uninterrupted run's exactly: server and every client."""
  from a2v_jax import checkpoint as ckpt_lib
  cfg, alg, shared, data, lay = _setup("avg", ["join_ratio=0.67"])
  server0, clients0 = alg.init(jax.random.PRNGKey(7))
  conf = {"population": 3}

  def start(name):
    store = population.ClientStore(clients0, tmp_path / name)
    return population.PopulationRound(alg, cfg, 3, 2, _data_fn(data), store), jax.tree.map(jnp.copy, server0)

  pop, server = start("a")
  ckpt = ckpt_lib.RoundCheckpointer(tmp_path / "ckpt", max_to_keep=5)
  for _ in range(4):
    server, _, _ = pop(server, shared)
    pop.save(ckpt, server, conf)
  ckpt.close()
  for f in (tmp_path / "ckpt" / "4").rglob("*"):  # round 4 damaged on disk
    if f.is_file() and f.stat().st_size > 64 and "meta" not in f.parts:
      f.write_bytes(b"\0" * f.stat().st_size)
  shutil.rmtree(tmp_path / "ckpt" / "3")  # round 3 lost

  again, fresh = start("b")
  ckpt = ckpt_lib.RoundCheckpointer(tmp_path / "ckpt", max_to_keep=5)
  said = []
  resumed = again.restore(ckpt, fresh, conf, said.append)
  assert int(resumed.round) == 2 and any("round 4" in s for s in said)
  for _ in range(2):
    resumed, _, _ = again(resumed, shared)
  for x, y in zip(jax.tree.leaves(server), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  pop.flush(), again.flush()
  for x, y in zip(pop.store.arrays(), again.store.arrays()):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ckpt_lib.CheckpointError, match="another config"):
    again.restore(ckpt, fresh, {"population": 4}, said.append)
  ckpt.close()


def test_pfl_side_by_side_arguments(capsys, tmp_path):
  from benchmarks.pfl_side_by_side import parse_args
  for argv, msg in ((["--pfl-python", str(tmp_path / "nope")], "is not a file"),
                    (["--pfl-python", __file__, "--population", "10", "--cohort", "20"], "larger than the population")):
    with pytest.raises(SystemExit) as e:
      parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err
