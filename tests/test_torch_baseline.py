"""The sequential torch reference computes what the vmapped JAX engine computes, from the same init.

Both sides start from the same weights (the JAX server params, copied into torch) and see the same
batches. The JAX engine shuffles with ``jax.random`` inside the jitted round, so:
  * the first test uses one full batch per epoch, where the order cannot matter (independent of any
    engine internals);
  * the second test uses mini-batches and rebuilds the engine's batch order from the clients' keys
    with a numpy/jax mirror of ``local.py``'s shuffle (documented below); it breaks, loudly, if that
    shuffle changes, which is what a parity test should do.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from a2v_jax import config  # noqa: E402
from a2v_jax.reference import torch_baseline as tr  # noqa: E402
from a2v_jax.federated import engine  # noqa: E402
from a2v_jax.federated.local import Shared  # noqa: E402
from a2v_jax.models.heads import make_heads  # noqa: E402
from a2v_jax.run.trainer import layout  # noqa: E402
from experiments.scaling import replicated_init  # noqa: E402
from tests.fakes import synthetic_prepared  # noqa: E402


@functools.lru_cache(maxsize=None)
def _jax_side(batch_size, overrides):
  """Config, algorithm, data and initial state (cached: the flax init compiles slowly on CPU)."""
  cfg = config.load(None, ['adapter_aggregation_mode="avg"', "local_epochs=2", f"batch_size={batch_size}",
                           "clip_adapter_hidden=[16]", "t5_adapter_hidden=[16, 16]", "map_heads=2",
                           "num_nodes=3", "clip_adapter_weight_decay=0.01", *overrides])
  prep = synthetic_prepared()
  lay = layout(cfg, prep)
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prep.targets.items()})
  apply_fn = lambda p, x: heads.apply({"params": p}, x)
  init_fn = lambda k: heads.init(k, jnp.zeros((1,) + prep.features.shape[1:]))["params"]
  alg = engine.fed_a2v(cfg, apply_fn, init_fn, steps=lay.steps, num_clients=lay.train_idx.shape[0])
  shared = Shared(jnp.asarray(prep.features), jnp.asarray(prep.nodes.clipset.labels),
                  {b: jnp.asarray(t) for b, t in prep.targets.items()})
  data = engine.RoundData(jnp.asarray(lay.train_idx), jnp.asarray(lay.train_count))
  # avg mode overwrites every client's params with the server's in round 1, so clients may start as
  # copies (scaling.replicated_init): same keys and optimiser state as alg.init, a much cheaper compile.
  server, clients = jax.jit(lambda k: replicated_init(cfg, init_fn, lay.train_idx.shape[0], k))(jax.random.PRNGKey(0))
  return cfg, prep, heads, alg, shared, data, lay, server, clients


def _setup(batch_size, overrides=()):
  """The JAX side plus a fresh torch reference loaded with the JAX server's initial params."""
  cfg, prep, heads, alg, shared, data, lay, server, clients = _jax_side(batch_size, tuple(overrides))
  feats = torch.from_numpy(np.array(prep.features, np.float32))
  ref = tr.build_from_flax(heads, jax.device_get(server.params), prep.features.shape[-1], lay.train_idx.shape[0],
                           cfg, features=lambda rows: feats[rows], labels=np.asarray(prep.nodes.clipset.labels),
                           targets=prep.targets)
  return cfg, heads, alg, shared, data, lay, server, clients, ref


def _mirror_engine_batches(rng, idx_row, count, batch_size, steps, epochs):
  """The batches ``local.py`` draws for one client: per epoch ``rng, sub = split(rng)``, uniform noise
  on valid positions, argsort (valid first), then consecutive slices of ``batch_size``."""
  width = idx_row.shape[0]
  valid = jnp.arange(width) < count
  out = []
  for _ in range(epochs):
    rng, sub = jax.random.split(rng)
    order = np.asarray(jnp.argsort(jnp.where(valid, jax.random.uniform(sub, (width,)), 2.0)))
    out.append([idx_row[order[s * batch_size:min((s + 1) * batch_size, count)]]
                for s in range(steps) if s * batch_size < count])
  return out


def _compare(server, clients_metrics, ref, ref_metrics, rtol, atol):
  for k, v in clients_metrics.items():
    if k.endswith("_loss"):
      np.testing.assert_allclose(np.asarray(v), np.asarray(ref_metrics[k]), rtol=rtol, atol=atol, err_msg=k)
  got = tr.flax_params(ref.global_model)
  for path, a in jax.tree_util.tree_leaves_with_path(jax.device_get(server.params)):
    b = got
    for p in path:
      b = b[p.key]
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_load_and_forward_match():
  cfg, heads, alg, shared, data, lay, server, clients, ref = _setup(32)
  x = np.array(shared.features[:5])
  want = heads.apply({"params": server.params}, jnp.asarray(x))
  got = ref.global_model(torch.from_numpy(x))
  for b in want:
    np.testing.assert_allclose(np.asarray(want[b]), got[b].detach().numpy(), rtol=1e-5, atol=1e-5)
  # flax_params inverts load_flax_params exactly
  back = tr.flax_params(ref.global_model)
  for a, b in zip(jax.tree.leaves(jax.device_get(server.params)), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_full_batch_rounds_match():
  """One full batch per epoch (order-free), 2 epochs, 3 rounds, clients of different sizes."""
  cfg, heads, alg, shared, data, lay, server, clients, ref = _setup(32)
  assert lay.steps == 1
  round_fn = jax.jit(alg.round)
  rows = [lay.train_idx[c, :lay.train_count[c]] for c in range(lay.train_idx.shape[0])]
  for r in range(3):
    server, clients, m = round_fn(server, clients, data, shared)
    ref_m = ref.round([[[row]] * cfg.train.local_epochs for row in rows], epoch0=r * cfg.train.local_epochs)
    _compare(server, m, ref, ref_m, rtol=2e-4, atol=2e-5)


def test_minibatch_rounds_match_with_mirrored_order():
  """Batch 4, learning-rate schedule, gradient clipping; batch order rebuilt from the engine's keys."""
  cfg, heads, alg, shared, data, lay, server, clients, ref = _setup(
      4, ["clip_adapter_learning_rate_schedule=true", "optimizer_clip_gradients=true", "global_rounds=2"])
  assert lay.steps > 2
  round_fn = jax.jit(alg.round)
  for r in range(2):
    batches = [_mirror_engine_batches(clients.rng[c], lay.train_idx[c], int(lay.train_count[c]),
                                      cfg.train.batch_size, lay.steps, cfg.train.local_epochs)
               for c in range(lay.train_idx.shape[0])]
    server, clients, m = round_fn(server, clients, data, shared)
    ref_m = ref.round(batches, epoch0=r * cfg.train.local_epochs)
    _compare(server, m, ref, ref_m, rtol=1e-3, atol=1e-4)


def test_study_times_the_reference_fedavg_whatever_the_config():
  """The torch side is plain FedAvg with a plain local loss; the JAX side must run the same algorithm."""
  from experiments import scaling
  args = scaling.parse_args(["--config", "experiments/configs/fsdd_tiny.json", "--clients", "1"])
  cfg, _ = scaling.config_for(args)
  default = config.load("experiments/configs/fsdd_tiny.json").federation
  assert default.server_momentum > 0 and default.local_drift_correction != "none"  # the premise
  f = cfg.federation
  assert (f.server_optimizer, f.server_learning_rate, f.server_momentum, f.local_drift_correction) == (
      "sgd", 1.0, 0.0, "none")
