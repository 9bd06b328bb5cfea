"""Drift corrections of local training (FedProx, SCAFFOLD) against an independent step-by-step computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from a2v_jax import config
from a2v_jax.federated import engine, optim
from a2v_jax.federated.local import Shared, branch_losses, make_local_train
from a2v_jax.federated.state import ClientState
from a2v_jax.models.heads import make_heads
from a2v_jax.run.trainer import layout
from tests.fakes import synthetic_prepared

LR, WD, ROWS = 1e-2, 1e-4, 4


def _pieces(correction, extra=()):
  """One client whose 4 rows fill one batch, 2 local epochs: 2 full-batch steps (order-free)."""
  cfg = config.load(None, ["local_epochs=2", f"batch_size={ROWS}", f"clip_adapter_learning_rate={LR}",
                           f"t5_adapter_learning_rate={LR}", "clip_adapter_hidden=[16]",
                           "t5_adapter_hidden=[16]", "map_heads=2",
                           f'local_drift_correction="{correction}"', *extra])
  prep = synthetic_prepared()
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prep.targets.items()})
  apply_fn = lambda p, x: heads.apply({"params": p}, x)
  params = heads.init(jax.random.PRNGKey(0), jnp.zeros((1,) + prep.features.shape[1:]))["params"]
  shared = Shared(jnp.asarray(prep.features), jnp.asarray(prep.nodes.clipset.labels),
                  {b: jnp.asarray(t) for b, t in prep.targets.items()})
  rows = jnp.asarray(prep.nodes.nodes[0]["train"][:ROWS], jnp.int32)
  tx = optim.client_optimizer(cfg)
  train = make_local_train(cfg, apply_fn, tx, ROWS, 1)

  def data_loss(p):
    x = shared.features[rows]
    y = {b: t[shared.labels[rows]] for b, t in shared.targets.items()}
    return sum(branch_losses(apply_fn(p, x), y, jnp.ones((ROWS,)), 0.0).values())

  return cfg, params, shared, rows, tx, train, data_loss


def _close(a, b, rtol=2e-4, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_fedprox_adds_the_proximal_gradient_to_each_step():
  mu = 0.5
  cfg, w0, shared, rows, tx, train, data_loss = _pieces("fedprox", [f"fedprox_mu={mu}"])
  client = ClientState(params=w0, opt_state=tx.init(w0), rng=jax.random.PRNGKey(1))
  out, _ = jax.jit(train)(client, rows, jnp.int32(ROWS), jnp.int32(0), shared)

  adamw = optax.adamw(LR, weight_decay=WD)  # both branches share the rate: one AdamW is the same math
  state, w = adamw.init(w0), w0
  for _ in range(2):
    g = jax.grad(data_loss)(w)
    g = jax.tree.map(lambda gi, wi, ai: gi + mu * (wi - ai), g, w, w0)
    upd, state = adamw.update(g, state, w)
    w = optax.apply_updates(w, upd)
  _close(out.params, w)
  # And mu really matters: plain training lands elsewhere.
  *_, plain_train, _ = _pieces("none")
  plain, _ = jax.jit(plain_train)(client, rows, jnp.int32(ROWS), jnp.int32(0), shared)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(plain.params),
                                                          jax.tree.leaves(out.params)))
  assert gap > 1e-5


def test_scaffold_corrects_gradients_and_keeps_their_mean_as_control():
  cfg, w0, shared, rows, tx, train, data_loss = _pieces("scaffold")
  key = jax.random.PRNGKey(5)
  rand = lambda k: jax.tree.map(lambda p: 0.01 * jax.random.normal(k, p.shape), w0)
  c_server, c_client = rand(key), rand(jax.random.fold_in(key, 1))
  client = ClientState(params=w0, opt_state=tx.init(w0), rng=jax.random.PRNGKey(1), control=c_client)
  out, _ = jax.jit(train)(client, rows, jnp.int32(ROWS), jnp.int32(0), shared, c_server)

  adamw = optax.adamw(LR, weight_decay=WD)
  state, w, raw = adamw.init(w0), w0, []
  for _ in range(2):
    g = jax.grad(data_loss)(w)
    raw.append(g)
    upd, state = adamw.update(jax.tree.map(lambda gi, s, c: gi + s - c, g, c_server, c_client), state, w)
    w = optax.apply_updates(w, upd)
  _close(out.params, w)
  _close(out.control, jax.tree.map(lambda a, b: (a + b) / 2, *raw), rtol=1e-3, atol=1e-6)

  # No rows: params, moments and control all stay as they were.
  idle, _ = jax.jit(train)(client, rows, jnp.int32(0), jnp.int32(0), shared, c_server)
  for a, b in zip(jax.tree.leaves((idle.params, idle.opt_state, idle.control)),
                  jax.tree.leaves((client.params, client.opt_state, client.control))):
    np.testing.assert_array_equal(a, b)


def _round_setup(correction, extra=()):
  cfg = config.load(None, ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[16]",
                           "t5_adapter_hidden=[16]", "map_heads=2", "num_nodes=3",
                           f'local_drift_correction="{correction}"', *extra])
  prep = synthetic_prepared()
  lay = layout(cfg, prep)
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prep.targets.items()})
  alg = engine.fed_a2v(cfg, lambda p, x: heads.apply({"params": p}, x),
                       lambda k: heads.init(k, jnp.zeros((1,) + prep.features.shape[1:]))["params"],
                       steps=lay.steps, num_clients=lay.train_idx.shape[0])
  shared = Shared(jnp.asarray(prep.features), jnp.asarray(prep.nodes.clipset.labels),
                  {b: jnp.asarray(t) for b, t in prep.targets.items()})
  data = engine.RoundData(jnp.asarray(lay.train_idx), jnp.asarray(lay.train_count))
  return alg, shared, data


def test_scaffold_round_one_is_fedavg_and_the_server_control_is_the_clients_mean():
  alg, shared, data = _round_setup("scaffold")
  base, *_ = _round_setup("none")
  server, clients = alg.init(jax.random.PRNGKey(0))
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves((server.control, clients.control)))
  s1, c1, _ = jax.jit(alg.round)(server, clients, data, shared)
  b_server, b_clients = base.init(jax.random.PRNGKey(0))
  b1, bc1, _ = jax.jit(base.round)(b_server, b_clients, data, shared)
  _close(s1.params, b1.params, rtol=1e-5)  # zero controls: no correction in the first round
  _close(s1.control, jax.tree.map(lambda c: c.mean(0), c1.control), rtol=1e-5)
  s2, _, _ = jax.jit(alg.round)(s1, c1, data, shared)
  b2, _, _ = jax.jit(base.round)(b1, bc1, data, shared)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s2.params),
                                                          jax.tree.leaves(b2.params)))
  assert gap > 1e-6  # from round 2 the corrections act


def test_scaffold_partial_participation_scales_the_server_step():
  alg, shared, data = _round_setup("scaffold", ["join_ratio=0.34"])
  server, clients = alg.init(jax.random.PRNGKey(3))
  s1, c1, m = jax.jit(alg.round)(server, clients, data, shared)
  chosen = np.nonzero(np.asarray(m["participate"]))[0]
  assert len(chosen) == 1
  others = [i for i in range(3) if i not in chosen]
  for leaf in jax.tree.leaves(c1.control):
    assert float(jnp.abs(leaf[np.asarray(others)]).max()) == 0  # non-participants keep their control
  _close(s1.control, jax.tree.map(lambda c: c[chosen[0]] / 3, c1.control), rtol=1e-5)


def test_bad_drift_keys_are_refused():
  with pytest.raises(config.ConfigError, match="fedprox_mu"):
    config.load(None, ['local_drift_correction="fedprox"', "fedprox_mu=-1"])
  with pytest.raises(config.ConfigError, match="local_drift_correction"):
    config.load(None, ['local_drift_correction="feddyn"'])
