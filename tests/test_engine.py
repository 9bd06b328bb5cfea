"""The vmapped round equals a looped per-client reference; it compiles once; masks work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2v_jax import config
from a2v_jax.federated import engine
from a2v_jax.federated.local import Shared
from a2v_jax.models.heads import make_heads
from a2v_jax.run.trainer import init_state, layout
from tests.fakes import synthetic_prepared


def _setup(mode="avg", overrides=()):
  cfg = config.load(None, [f'adapter_aggregation_mode="{mode}"', "local_epochs=2", "batch_size=4",
                           "clip_adapter_hidden=[16]", "t5_adapter_hidden=[16]", "map_heads=2",
                           "num_nodes=3", *overrides])
  prep = synthetic_prepared()
  lay = layout(cfg, prep)
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prep.targets.items()})
  apply_fn = lambda p, x: heads.apply({"params": p}, x)
  init_fn = lambda k: heads.init(k, jnp.zeros((1,) + prep.features.shape[1:]))["params"]
  alg = engine.fed_a2v(cfg, apply_fn, init_fn, steps=lay.steps, num_clients=lay.train_idx.shape[0])
  shared = Shared(jnp.asarray(prep.features), jnp.asarray(prep.nodes.clipset.labels),
                  {b: jnp.asarray(t) for b, t in prep.targets.items()})
  data = engine.RoundData(jnp.asarray(lay.train_idx), jnp.asarray(lay.train_count))
  return cfg, alg, shared, data, lay


@pytest.mark.parametrize("mode", ["avg", "weighted", "none"])
def test_vmapped_round_equals_looped_clients(mode):
  cfg, alg, shared, data, lay = _setup(mode)
  server, clients = alg.init(jax.random.PRNGKey(0))
  new_server, new_clients, _ = jax.jit(alg.round)(server, clients, data, shared)

  # Independent loop: one client at a time, then a numpy FedAvg.
  num = lay.train_idx.shape[0]
  looped = []
  for c in range(num):
    client = jax.tree.map(lambda x: x[c], clients)
    if mode != "none":
      client = client.replace(params=server.params)
    out, _ = jax.jit(alg.local_train)(client, data.idx[c], data.count[c], jnp.int32(0), shared)
    looped.append(out)
  for c in range(num):
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[c], new_clients.params)),
                    jax.tree.leaves(looped[c].params)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  counts = np.asarray(lay.train_count, np.float64)
  w = counts if mode == "weighted" else np.ones(num)
  for g, *per in zip(jax.tree.leaves(new_server.params), *[jax.tree.leaves(l.params) for l in looped]):
    expected = sum(wi * np.asarray(p, np.float64) for wi, p in zip(w, per)) / w.sum()
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-5)


def test_round_compiles_once_and_learns():
  cfg, alg, shared, data, _ = _setup("avg")
  server, clients = alg.init(jax.random.PRNGKey(1))
  round_fn = engine.jit_round(alg)
  losses = []
  for _ in range(4):
    server, clients, m = round_fn(server, clients, data, shared)
    losses.append(float(np.mean(m["clip_loss"]) + np.mean(m["t5_loss"])))
  assert round_fn._cache_size() == 1
  assert losses[-1] < losses[0]


def test_padded_rows_and_empty_clients_do_not_matter():
  cfg, alg, shared, data, lay = _setup("avg")
  server, clients = alg.init(jax.random.PRNGKey(2))
  # Garbage in padding positions must not change anything.
  idx = np.asarray(data.idx).copy()
  for c in range(idx.shape[0]):
    idx[c, lay.train_count[c]:] = 3
  s1, c1, _ = jax.jit(alg.round)(server, clients, data, shared)
  s2, c2, _ = jax.jit(alg.round)(server, clients, data._replace(idx=jnp.asarray(idx)), shared)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # A client with zero rows keeps its params and gets zero weight.
  count = np.asarray(data.count).copy()
  count[1] = 0
  s3, c3, m = jax.jit(alg.round)(server, clients, data._replace(count=jnp.asarray(count)), shared)
  assert not bool(m["participate"][1])
  for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[1], c3.params)),
                  jax.tree.leaves(jax.tree.map(lambda x: x[1], clients.params))):
    np.testing.assert_array_equal(a, b)


def test_join_ratio_samples_clients_deterministically():
  cfg, alg, shared, data, _ = _setup("avg", ["join_ratio=0.34"])
  server, clients = alg.init(jax.random.PRNGKey(3))
  _, _, m1 = jax.jit(alg.round)(server, clients, data, shared)
  server, clients = alg.init(jax.random.PRNGKey(3))
  _, _, m2 = jax.jit(alg.round)(server, clients, data, shared)
  assert int(np.sum(m1["participate"])) == 1
  np.testing.assert_array_equal(m1["participate"], m2["participate"])


def test_chunked_clients_equal_all_at_once():
  _, alg, shared, data, _ = _setup("avg")
  _, alg_chunk, _, _, _ = _setup("avg", ["client_chunk_size=2"])
  server, clients = alg.init(jax.random.PRNGKey(4))
  s1, _, _ = jax.jit(alg.round)(server, clients, data, shared)
  s2, _, _ = jax.jit(alg_chunk.round)(server, clients, data, shared)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_single_client_runs_unbatched_with_the_same_math():
  """over_clients: a size-1 client axis gets the plain program (no batched dots); results match vmap."""
  _, alg, shared, data, _ = _setup()
  _, clients = alg.init(jax.random.PRNGKey(0))
  one = jax.tree.map(lambda x: x[:1], clients)
  train = lambda c, i, n: alg.local_train(c, i, n, jnp.int32(0), shared)
  plain, m_plain = jax.jit(engine.over_clients(train))(one, data.idx[:1], data.count[:1])
  batched, m_batched = jax.jit(jax.vmap(train))(one, data.idx[:1], data.count[:1])
  batched_dots = lambda f: str(jax.make_jaxpr(f)(one, data.idx[:1], data.count[:1])).count("), ([0], [0]))")
  assert batched_dots(engine.over_clients(train)) < batched_dots(jax.vmap(train))
  for a, b in zip(jax.tree.leaves((plain, m_plain)), jax.tree.leaves((batched, m_batched))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # An empty client (count 0) leaves params and optimiser state bit-identical on the unbatched path too.
  idle, m_idle = jax.jit(engine.over_clients(train))(one, data.idx[:1], jnp.zeros((1,), jnp.int32))
  for a, b in zip(jax.tree.leaves((idle.params, idle.opt_state)), jax.tree.leaves((one.params, one.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert all(float(v[0]) == 0.0 for v in m_idle.values())


def test_sampled_round_averages_the_sampled_clients_only_and_resamples():
  """join_ratio < 1: each round's server model is the numpy mean of the sampled clients' params, trained
  one by one from the global model; the others keep theirs; the sample changes between rounds."""
  cfg, alg, shared, data, lay = _setup("avg", ["join_ratio=0.67"])
  num = lay.train_idx.shape[0]
  m = engine.num_participants(cfg, num)
  assert 0 < m < num
  round_fn, local_train = jax.jit(alg.round), jax.jit(alg.local_train)
  server, clients = init_state(alg, jax.random.PRNGKey(5))  # one cheap program, not ~300 eager ones
  masks = []
  for r in range(4):
    new_server, new_clients, metrics = round_fn(server, clients, data, shared)
    part = np.asarray(metrics["participate"])
    assert part.sum() == m
    masks.append(part)
    trained = []
    for c in np.flatnonzero(part):
      client = jax.tree.map(lambda x: np.asarray(x)[c], clients).replace(params=server.params)
      out, _ = local_train(client, data.idx[c], data.count[c], jnp.int32(r * cfg.train.local_epochs), shared)
      trained.append([np.asarray(p, np.float64) for p in jax.tree.leaves(out.params)])
      for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[c], new_clients.params)), trained[-1]):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for c in np.flatnonzero(~part):
      for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[c], new_clients.params)),
                      jax.tree.leaves(jax.tree.map(lambda x: x[c], clients.params))):
        np.testing.assert_array_equal(a, b)
    for g, *per in zip(jax.tree.leaves(new_server.params), *trained):
      np.testing.assert_allclose(g, np.mean(per, axis=0), rtol=1e-4, atol=1e-5)
    server, clients = new_server, new_clients
  assert len({mask.tobytes() for mask in masks}) > 1, masks


def test_learning_rate_schedule_over_rounds_equals_an_independent_adamw():
  """Cosine decay over rounds x local epochs, applied at epoch index round * local_epochs + e: one client
  (centralised: the server takes its model), one batch per epoch, so the run is a plain AdamW whose rate
  follows optax's step count. A schedule one epoch (or one round) ahead or behind fails this test."""
  import optax
  from a2v_jax.federated.local import branch_losses
  rounds, epochs, lr = 3, 2, 3e-2
  cfg, alg, shared, data, lay = _setup("centralised", [
      "batch_size=64", f"local_epochs={epochs}", f"global_rounds={rounds}", 'learning_rate_decay="cosine"',
      f"clip_adapter_learning_rate={lr}", f"t5_adapter_learning_rate={lr}", 'local_drift_correction="none"'])
  assert lay.steps == 1
  server, clients = alg.init(jax.random.PRNGKey(3))
  round_fn = jax.jit(alg.round)
  for _ in range(rounds):
    server, clients, _ = round_fn(server, clients, data, shared)

  heads = make_heads(cfg, {b: t.shape[1:] for b, t in shared.targets.items()})
  rows = np.asarray(data.idx[0, :int(data.count[0])])
  x, labels = shared.features[rows], shared.labels[rows]
  y = {b: t[labels] for b, t in shared.targets.items()}

  def loss(p):
    return sum(branch_losses(heads.apply({"params": p}, x), y, jnp.ones(len(rows)), 0.0).values())
  grad = jax.jit(jax.grad(loss))

  def independent(shift):
    total = rounds * epochs
    sched = lambda count: lr * (1 + jnp.cos(jnp.pi * (count + shift) / total)) / 2
    tx = optax.multi_transform({b: optax.adamw(sched, weight_decay=getattr(cfg.train, f"{b}_adapter_weight_decay"))
                                for b in cfg.branches}, lambda p: {k: k for k in p})
    p, state = init_params, tx.init(init_params)
    for _ in range(total):
      updates, state = tx.update(grad(p), state, p)
      p = optax.apply_updates(p, updates)
    return p

  init_params = alg.init(jax.random.PRNGKey(3))[0].params  # round 1 broadcasts the server's init to the client
  close = lambda a, b: all(np.allclose(u, v, rtol=2e-3, atol=2e-5) for u, v in
                           zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert close(server.params, independent(0))
  assert not close(server.params, independent(epochs))  # one round ahead
  assert not close(server.params, independent(-1))      # one epoch behind


def test_sampled_sample_weighted_fedavg_equals_numpy():
  """join_ratio 0.67 with 'weighted': the sampled clients (the round's ``participate``) train from the server
  model, and the new server model is their count-weighted mean (numpy, float64); the others keep their state."""
  cfg, alg, shared, data, lay = _setup("weighted", ["join_ratio=0.67"])
  server, clients = alg.init(jax.random.PRNGKey(5))
  new_server, new_clients, m = jax.jit(alg.round)(server, clients, data, shared)
  part = np.asarray(m["participate"])
  assert part.sum() == 2
  counts = np.asarray(lay.train_count, np.float64)
  trained = {}
  for c in np.flatnonzero(part):
    client = jax.tree.map(lambda x: x[c], clients).replace(params=server.params)
    trained[c], _ = jax.jit(alg.local_train)(client, data.idx[c], data.count[c], jnp.int32(0), shared)
  for g, *per in zip(jax.tree.leaves(new_server.params), *[jax.tree.leaves(trained[c].params) for c in trained]):
    w = counts[list(trained)]
    expected = sum(wi * np.asarray(p, np.float64) for wi, p in zip(w, per)) / w.sum()
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-5)
  for c in np.flatnonzero(~part):  # an unsampled client is untouched
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[c], new_clients.params)),
                    jax.tree.leaves(jax.tree.map(lambda x: x[c], clients.params))):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode, extra", [("weighted", ['local_drift_correction="scaffold"']), ("none", []),
                                         ("avg", ["client_chunk_size=1"])])
def test_cohort_program_equals_the_full_program(mode, extra):
  """join_ratio 0.67 of 3 clients: training only the sampled cohort gives the full program's numbers (every
  client trained, the others on zero rows) over three rounds -- server, every client, metrics."""
  cfg, alg, shared, data, lay = _setup(mode, ["join_ratio=0.67", *extra])
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in shared.targets.items()})
  full = engine.fed_a2v(cfg, lambda p, x: heads.apply({"params": p}, x),
                        lambda k: heads.init(k, jnp.zeros((1,) + shared.features.shape[1:]))["params"],
                        steps=lay.steps, num_clients=lay.train_idx.shape[0], cohort=False)
  a = alg.init(jax.random.PRNGKey(7))
  b = full.init(jax.random.PRNGKey(7))
  cohort_fn, full_fn = jax.jit(alg.round), jax.jit(full.round)
  seen = set()
  for _ in range(3):
    *a, ma = cohort_fn(*a, data, shared)
    *b, mb = full_fn(*b, data, shared)
    np.testing.assert_array_equal(ma["participate"], mb["participate"])
    seen.add(tuple(np.asarray(ma["participate"])))
    for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb))):
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-6, atol=1e-7)
  assert all(sum(s) == 2 for s in seen)
