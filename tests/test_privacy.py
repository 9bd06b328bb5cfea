"""Record-level DP: DP-SGD's clipped noisy sum, the accountant (dp-accounting called directly), calibration, the
run's stated epsilon every round and after a resume, and refusals."""

import json

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp

from a2v_jax import config
from a2v_jax.config import ConfigError
from a2v_jax.federated import engine, privacy
from a2v_jax.run.trainer import train_and_evaluate
from a2v_jax.federated.local import Shared
from a2v_jax.models.heads import make_heads
from a2v_jax.run.trainer import layout
from tests.fakes import synthetic_prepared

BASE = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2",
        "num_nodes=3", "checkpoint_frequency=1"]


def test_one_example_moves_the_sum_by_at_most_the_clip():
  rng = np.random.default_rng(0)
  grads = {"a": jnp.asarray(rng.normal(size=(6, 3, 4)) * 10), "b": jnp.asarray(rng.normal(size=(6, 5)))}
  grads["a"] = grads["a"].at[2].multiply(1e4)  # an outlier
  mask = jnp.ones(6)
  key = jax.random.key(0)
  with_it, norms = privacy.clipped_noisy_sum(grads, mask, 0.5, 0.0, key)
  without, _ = privacy.clipped_noisy_sum(grads, mask.at[2].set(0.0), 0.5, 0.0, key)
  diff = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in
                     zip(jax.tree.leaves(with_it), jax.tree.leaves(without))))
  assert diff == pytest.approx(0.5, rel=1e-5)  # exactly the clip: its gradient was far beyond it
  want = np.sqrt(np.sum(np.asarray(grads["a"]).reshape(6, -1) ** 2, 1) + np.sum(np.asarray(grads["b"]) ** 2, 1))
  np.testing.assert_allclose(norms, want, rtol=1e-5)


def test_noise_std_is_multiplier_times_clip():
  zeros = {"w": jnp.zeros((4, 2000))}
  draws = np.stack([np.asarray(privacy.clipped_noisy_sum(zeros, jnp.ones(4), 0.7, 1.3, jax.random.key(i))[0]["w"])
                    for i in range(10)])
  assert draws.std() == pytest.approx(0.7 * 1.3, rel=0.02) and abs(draws.mean()) < 0.02


def test_epsilon_is_dp_accounting_s_and_rdp_agrees():
  q, z, steps, delta = 0.05, 1.1, 300, 1e-5
  acc = pld.PLDAccountant()
  acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps))
  assert privacy.epsilon(q, z, steps, delta) == acc.get_epsilon(delta)
  r = privacy.epsilon(q, z, steps, delta, accountant="rdp")
  assert 0.7 * r <= privacy.epsilon(q, z, steps, delta) <= r * 1.02  # PLD is tighter than RDP, not far off
  # weak guarantees come from RDP's bound: the PLD grid there would need tens of GB (27 GB measured)
  weak = privacy.epsilon(0.02, 0.3, 20000, 1e-3)
  assert weak > privacy.PLD_MAX_EPSILON and weak == privacy.epsilon(0.02, 0.3, 20000, 1e-3, accountant="rdp")
  a = privacy.RecordAccountant([0.5, 0.25], [4, 8], z, delta)
  a.record(np.array([True, False]))
  a.record(np.array([True, True]))
  np.testing.assert_array_equal(a.steps, [8, 8])
  assert a.row()["privacy/node_1/epsilon"] == privacy.epsilon(0.25, z, 8, delta)


def test_calibration_reaches_the_target_and_refuses_the_unreachable():
  z = privacy.calibrate(2.0, [0.1, 0.2], [100, 50], 1e-5)
  worst = lambda s: max(privacy.epsilon(0.1, s, 100, 1e-5), privacy.epsilon(0.2, s, 50, 1e-5))
  assert worst(z) <= 2.0 < worst(z * 0.99)
  with pytest.raises(privacy.PrivacyError, match="out of reach"):
    privacy.calibrate(1e-6, [1.0], [10 ** 6], 1e-5)


def _setup_engine(extra, **data):
  cfg = config.load(None, ['adapter_aggregation_mode="avg"', "local_epochs=1", "batch_size=4", "clip_adapter_hidden=[16]",
                           "t5_adapter_hidden=[16]", "map_heads=2", "num_nodes=3", *extra])
  prep = synthetic_prepared(**data)
  lay = layout(cfg, prep)
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prep.targets.items()})
  alg = engine.fed_a2v(cfg, lambda p, x: heads.apply({"params": p}, x),
                       lambda k: heads.init(k, jnp.zeros((1,) + prep.features.shape[1:]))["params"],
                       steps=lay.steps, num_clients=3)
  shared = Shared(jnp.asarray(prep.features), jnp.asarray(prep.nodes.clipset.labels),
                  {b: jnp.asarray(t) for b, t in prep.targets.items()})
  return cfg, alg, shared, engine.RoundData(jnp.asarray(lay.train_idx), jnp.asarray(lay.train_count)), lay


def test_dp_sgd_without_noise_and_a_loose_clip_is_plain_sgd():
  """Per-example gradients averaged over the batch are the batch gradient: with no noise and a clip above every
  example's norm, a DP round gives the plain round's numbers."""
  full_batches = dict(per_node=(20, 20, 40))  # 12 / 12 / 24 train rows: full batches of 4 only
  _, alg, shared, data, _ = _setup_engine([], **full_batches)
  _, dp_alg, _, _, _ = _setup_engine(['dp_level="record"', "dp_noise_multiplier=1e-30",
                                      "dp_l2_clip=1e6"], **full_batches)
  server, clients = alg.init(jax.random.PRNGKey(0))
  a = jax.jit(alg.round)(server, clients, data, shared)
  server, clients = dp_alg.init(jax.random.PRNGKey(0))
  b = jax.jit(dp_alg.round)(server, clients, data, shared)
  for x, y in zip(jax.tree.leaves(a[0].params), jax.tree.leaves(b[0].params)):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


def _rows(run_dir):
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_states_its_epsilon_every_round_and_after_a_resume(tmp_path, capsys):
  prep = synthetic_prepared()
  dp = ['dp_level="record"', "dp_target_epsilon=3.0", "dp_delta=1e-4", "join_ratio=0.67"]
  cfg = lambda name, rounds: config.load(None, BASE + dp + [f'output_dir="{tmp_path}"', f'name="{name}"',
                                                            f"global_rounds={rounds}"])
  summary = train_and_evaluate(cfg("straight", 3), verbose=True, prepared=prep)
  out = capsys.readouterr().out
  assert "DP: noise multiplier" in out and "calibrated for epsilon 3.0" in out
  rows = _rows(tmp_path / "straight")
  eps = np.array([[r[f"privacy/node_{i}/epsilon"] for i in range(3)] for r in rows])
  assert (np.diff(eps, axis=0) >= 0).all() and eps[-1].max() <= 3.0 + 1e-9
  trained = np.array([[r[f"train/node_{i}/clip_loss"] != 0.0 for i in range(3)] for r in rows])
  n = np.array([len(node["train"]) for node in prep.nodes.nodes])
  steps = np.cumsum(trained, 0) * np.ceil(n / 4)
  np.testing.assert_array_equal([[r[f"privacy/node_{i}/dp_steps"] for i in range(3)] for r in rows], steps)
  d = summary["dp"]
  z = d["noise_multiplier"]
  for i in range(3):  # dp-accounting called directly on what node i did
    assert eps[-1, i] == pytest.approx(privacy.epsilon(4 / n[i], z, int(steps[-1, i]), 1e-4), rel=1e-9)
  assert d["epsilon_max"] == eps[-1].max()
  # a resumed run (the noise given: a target is calibrated to global_rounds) states what a straight one does
  fixed = lambda name, rounds: config.load(None, BASE + dp[2:] + [
      f'output_dir="{tmp_path}"', f'name="{name}"', f"global_rounds={rounds}", 'dp_level="record"',
      f"dp_noise_multiplier={z}"])
  train_and_evaluate(fixed("split", 1), verbose=False, prepared=prep)
  train_and_evaluate(fixed("split", 3), resume=True, verbose=False, prepared=prep)
  pick = lambda rows: [{k: v for k, v in r.items() if k.startswith(("privacy/", "train/"))} for r in rows]
  assert pick(_rows(tmp_path / "split")) == pick(rows)


@pytest.mark.parametrize("keys, msg", [
    (["dp_noise_multiplier=1.0"], "'dp_level' is not"),
    (['dp_level="record"'], "exactly one of"),
    (['dp_level="record"', "dp_noise_multiplier=1.0", "dp_target_epsilon=2.0"], "exactly one of"),
    (['dp_level="record"', "dp_noise_multiplier=0"], "'dp_noise_multiplier' must be > 0"),
    (['dp_level="record"', "dp_noise_multiplier=1", "dp_l2_clip=-1"], "'dp_l2_clip' must be > 0"),
    (['dp_level="record"', "dp_noise_multiplier=1", 'adapter_aggregation_mode="kd"', "use_pretrained_generators=true"],
     "not supported with KD"),
    (['dp_level="node"', "dp_noise_multiplier=1", "use_pretrained_generators=true"], "Run 2 at node level"),
    (['dp_level="record"', "dp_noise_multiplier=1", "use_pretrained_generators=true", "global_model_train=true"],
     "server global training"),
    (['dp_level="record"', "dp_noise_multiplier=1", 'local_drift_correction="scaffold"'], "SCAFFOLD"),
])
def test_bad_dp_settings_are_refused(keys, msg):
  with pytest.raises(ConfigError, match=msg):
    config.load(None, keys)


def test_node_level_dp_bounds_an_adversarial_client():
  """Node-level DP-FedAvg's mean: a participant sending a 10^6-sized update moves the global model by at most
  clip / m more than without it; and in the engine's round the global model moves by at most the clip."""
  rng = np.random.default_rng(0)
  glob = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}
  honest = jnp.asarray(glob["w"][None] + 0.01 * rng.normal(size=(3, 5, 4)), jnp.float32)
  attacked = honest.at[1].add(1e6)
  part, key = jnp.ones(3), jax.random.key(0)
  a, _ = privacy.dp_mean_update(glob, {"w": honest}, part, jnp.float32(0.05), 0.0, 3, key)
  b, norms = privacy.dp_mean_update(glob, {"w": attacked}, part, jnp.float32(0.05), 0.0, 3, key)
  assert float(norms[1]) > 1e6 and np.linalg.norm(np.asarray(a["w"] - b["w"])) <= 2 * 0.05 / 3 * (1 + 1e-5)
  assert np.linalg.norm(np.asarray(attacked.mean(0) - honest.mean(0))) > 1e5  # plain FedAvg follows it
  cfg, alg, shared, data, lay = _setup_engine(["server_momentum=0.0", 'dp_level="node"', "dp_noise_multiplier=1e-30",
                                               "dp_l2_clip=1e-3"])
  server, clients = alg.init(jax.random.PRNGKey(0))
  new, _, _ = jax.jit(alg.round)(server, clients, data, shared)
  moved = np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2)
                      for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(server.params))))
  assert 0 < moved <= 1e-3 * (1 + 1e-4)


def test_adaptive_clip_tracks_the_target_quantile():
  rng = np.random.default_rng(0)
  norms = jnp.asarray(rng.lognormal(0.0, 1.0, 1000), jnp.float32)  # a synthetic population's update norms
  part, clip = jnp.ones(1000), jnp.float32(20.0)
  step = jax.jit(lambda c, k: privacy.adaptive_clip(c, norms, part, 1000, 0.3, 0.2, 50.0, k))
  for i in range(300):
    clip = step(clip, jax.random.key(i))
  assert float(clip) == pytest.approx(np.quantile(np.asarray(norms), 0.3), rel=0.1)
  z = privacy.update_noise_multiplier(1.0, 50.0, 1000)  # the count takes a share of the budget
  assert z > 1.0 and (z ** -2 + (2 * 50.0) ** -2) ** -0.5 == pytest.approx(1.0)
  with pytest.raises(privacy.PrivacyError, match="raise dp_clipped_count_stddev"):
    privacy.update_noise_multiplier(1.0, 0.4, 1000)


def test_node_level_run_states_the_population_epsilon(tmp_path):
  prep = synthetic_prepared()
  cfg = config.load(None, BASE + ['dp_level="node"', "dp_noise_multiplier=0.8", "dp_adaptive_clip=true",
                                  "dp_clipped_count_stddev=1.0", "join_ratio=0.67", "global_rounds=3",
                                  f'output_dir="{tmp_path}"', 'name="node"'])
  summary = train_and_evaluate(cfg, verbose=False, prepared=prep)
  rows = _rows(tmp_path / "node")
  delta = 1 / 3 ** 1.1
  for r, row in enumerate(rows, 1):
    assert row["privacy/epsilon"] == pytest.approx(privacy.epsilon(2 / 3, 0.8, r, delta), rel=1e-9)
    assert row["privacy/dp_rounds"] == r
  clips = [row["privacy/clip"] for row in rows]
  assert len(set(clips)) == 3 and all(c > 0 for c in clips)  # adapted every round
  assert summary["dp"]["level"] == "node" and summary["dp"]["epsilon"] == rows[-1]["privacy/epsilon"]
