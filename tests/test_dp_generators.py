"""DP generators: DP-SGD of Run 1's VAEs, each node's epsilon in their checkpoints, Run 2 stating and requiring it."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from a2v_jax import config
from a2v_jax.config import ConfigError
from a2v_jax.federated import privacy
from a2v_jax.generators import checkpoint as gc
from a2v_jax.generators import runs as grn
from a2v_jax.generators import training as gt
from a2v_jax.run.trainer import start_pretrained, train_and_evaluate
from tests.fakes import synthetic_prepared

BASE = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2",
        "num_nodes=3", "generator_hidden_dim=16", "generator_latent_dim=4", "generator_training_sequence_length=2"]
RUN1 = ["use_generator=true", "generator_training_mode=true", "generator_only_mode=true", "generator_batch_size=8",
        "generator_training_epochs=2", "generator_standardize_features=false", "global_rounds=2",
        "generator_checkpoint_frequency=1"]
DP = ['dp_level="record"', "dp_l2_clip=0.5", "dp_noise_multiplier=1.1"]
RUN2 = ["use_pretrained_generators=true", 'synthetic_samples_per_class="4"', "global_rounds=1"]


def _cfg(tmp, name, *extra, gens="gens"):
  return config.load(None, BASE + [f'output_dir="{tmp}"', f'name="{name}"', f'generator_checkpoint_dir="{tmp}/{gens}"',
                                   *extra])


def _heads_rates(run_dir):
  """(rate, DP steps over the run) of each node's heads, from the run's summary and rows."""
  summary = json.loads((run_dir / "summary.json").read_text())["dp"]
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  steps = [rows[-1][f"privacy/node_{i}/dp_steps"] for i in range(3)]
  return summary["rates"], steps


def _grads(dp_clip=0.0, dp_noise=0.0, conditioned=False):
  g = config.load(None, BASE + ['generator_type="cvae"' if conditioned else 'generator_type="vae"']).generators
  spec = gt.GeneratorSpec.from_config(g, (2, 8), 3)
  spec = dataclasses.replace(spec, batch_size=4, dp_clip=dp_clip, dp_noise=dp_noise)
  params, _ = gt.init_slot(spec, jax.random.key(0))
  flat, unravel = ravel_pytree(params)
  return spec, flat, gt.make_vae_grads(spec, unravel)


def _batch(b=4, seed=1):
  rs = np.random.RandomState(seed)
  x = jnp.asarray(rs.randn(b, 2, 8), jnp.float32)
  return x, x, jnp.asarray(rs.randint(0, 3, b)), jnp.ones(b), jnp.asarray(rs.randn(b, 4), jnp.float32)


@pytest.mark.parametrize("conditioned", [False, True])
def test_dp_vae_gradient_without_noise_and_a_loose_clip_is_the_plain_gradient(conditioned):
  """Row by row (a batch of one each), unclipped, un-noised, / B: the full batch's mean-loss gradient."""
  _, flat, plain = _grads(conditioned=conditioned)
  _, _, dp = _grads(1e9, 0.0, conditioned)
  table = jnp.eye(3)
  args = (*_batch(), jax.random.key(2), jnp.int32(3), table)
  g_plain, p_plain = plain(flat, *args[:4], args[4], *args[5:])
  g_dp, p_dp = dp(flat, *args[:4], args[4], *args[5:])
  np.testing.assert_allclose(g_dp, g_plain, rtol=2e-4, atol=1e-7)
  for k in ("recon", "kl", "loss"):
    np.testing.assert_allclose(p_dp[k], p_plain[k], rtol=1e-5)


def test_one_row_moves_the_dp_vae_gradient_by_at_most_two_clips_over_b():
  """Replace one row by a wild one: without noise the DP gradient moves by <= 2 C / B (the plain one by far more);
  a padding row changes nothing; with noise the gradient's spread is z C / B per coordinate."""
  clip = 0.05
  _, flat, dp = _grads(clip, 0.0)
  _, _, plain = _grads()
  x, _, y, m, eps = _batch()
  wild = x.at[2].set(1e3)
  key, table = jax.random.key(2), jnp.eye(3)
  a, _ = dp(flat, x, x, y, m, eps, key, 0, table)
  b, _ = dp(flat, wild, wild, y, m, eps, key, 0, table)
  assert float(jnp.linalg.norm(a - b)) <= 2 * clip / 4 * (1 + 1e-5)
  assert float(jnp.linalg.norm(plain(flat, x, x, y, m, eps, key, 0, table)[0]
                               - plain(flat, wild, wild, y, m, eps, key, 0, table)[0])) > 1.0
  pad = m.at[2].set(0.0)
  c, _ = dp(flat, x, x, y, pad, eps, key, 0, table)
  d, _ = dp(flat, wild, wild, y, pad, eps, key, 0, table)
  np.testing.assert_array_equal(c, d)
  _, _, noisy = _grads(clip, 2.0)
  draws = np.stack([np.asarray(noisy(flat, x, x, y, m, eps, jax.random.key(k), 0, table)[0]) for k in range(40)])
  np.testing.assert_allclose(draws.std(0).mean(), 2.0 * clip / 4, rtol=0.05)


def test_generator_accountant_is_dp_accounting_per_node_and_key():
  """Cells (node, key) of n rows: epochs * ceil(n / B) steps per round at rate B / n; a node's epsilon is its worst
  key's (parallel composition over disjoint rows), each equal to dp-accounting's PLD called directly."""
  import dp_accounting as dpa
  counts = np.array([[10, 0, 3], [0, 0, 0], [25, 7, 1]])
  acc = privacy.GeneratorAccountant(counts, batch_size=4, epochs=2, noise_multiplier=1.3, delta=1e-4, clip=1.0)
  eps = acc.epsilons(3)

  def direct(n):
    q, steps = min(1.0, 4 / n), 2 * int(np.ceil(n / 4)) * 3
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(1.3)), steps)
    return dpa.pld.PLDAccountant().compose(event).get_epsilon(1e-4)

  np.testing.assert_allclose(eps, [max(direct(10), direct(3)), 0.0, max(direct(25), direct(7), direct(1))],
                             rtol=1e-6)
  assert acc.record(3)["epsilon_max"] == pytest.approx(eps.max())


@pytest.mark.parametrize("extra, msg", [
    (['dp_level="node"'], "'record'"),
    (["generator_only_mode=false"], "generator_only_mode"),
    (['generator_type="gan"'], "VAE"),
    (["generator_standardize_features=true"], "generator_standardize_features"),
])
def test_dp_generator_settings_that_cannot_hold_are_refused(extra, msg):
  with pytest.raises(ConfigError, match=msg):
    config.load(None, BASE + RUN1 + DP + extra)
  with pytest.raises(ConfigError, match="dp_require_generators"):
    config.load(None, BASE + ["dp_require_generators=true"])


def test_dp_run1_records_each_node_s_epsilon_and_run2_states_and_requires_it(tmp_path, capsys):
  """A generator-only Run 1 with three DP keys: its rows and every checkpoint state each node's epsilon (the
  accountant's on independently counted rows); Run 2 prints them; dp_require_generators accepts these generators
  and refuses, in one line, those of a Run 1 without DP."""
  prep = synthetic_prepared()
  cfg = _cfg(tmp_path, "dp1", *RUN1, *DP)
  summary = train_and_evaluate(cfg, verbose=True, prepared=prep)
  out = capsys.readouterr().out
  assert "DP generators (record level, DP-SGD): clip 0.5, noise multiplier 1.1000" in out
  rows = [json.loads(l) for l in (tmp_path / "dp1" / "metrics.jsonl").read_text().splitlines()]
  labels = prep.nodes.clipset.labels
  b, e = 8, 2
  for r, row in zip((1, 2), rows):
    manifest = json.loads((gc.round_dir(cfg.generators, r) / "manifest.json").read_text())
    want = []
    for n in prep.nodes.nodes:
      _, per_class = np.unique(labels[n["train"]], return_counts=True)
      want.append(max(privacy.epsilon(round(min(1.0, b / c), 12), 1.1, e * int(np.ceil(c / b)) * r,
                                      manifest["extra"]["dp"]["delta"]) for c in per_class))
    np.testing.assert_allclose(manifest["extra"]["dp"]["epsilon_per_node"], want, rtol=1e-9)
    np.testing.assert_allclose([row[f"privacy/node_{i}/epsilon"] for i in range(3)], want, rtol=1e-9)
    assert manifest["spec"]["dp_clip"] == 0.5 and manifest["spec"]["dp_noise"] == 1.1
  assert rows[1]["privacy/epsilon_max"] > rows[0]["privacy/epsilon_max"] > 0
  assert summary["dp"]["epsilon_max"] == pytest.approx(rows[1]["privacy/epsilon_max"])

  run2 = _cfg(tmp_path, "dp2", *RUN2, "dp_require_generators=true")
  start_pretrained(run2, prep, verbose=True)
  out = capsys.readouterr().out
  assert "record-level DP, epsilon node 0 " in out and f"{rows[1]['privacy/node_2/epsilon']:.3g}" in out

  # Run 2 with DP heads: each node's epsilon composes its generators' DP-SGD (worst key) with the heads' steps
  gen_dp = json.loads((gc.round_dir(cfg.generators, 2) / "manifest.json").read_text())["extra"]["dp"]
  heads = train_and_evaluate(_cfg(tmp_path, "dp3", *RUN2, *DP), verbose=False, prepared=prep)["dp"]
  import dp_accounting as dpa
  gauss = lambda q, z, n: dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), n)
  for i, (eps, q, steps) in enumerate(zip(heads["epsilon_per_node"], *_heads_rates(tmp_path / "dp3"))):
    n = len(prep.nodes.nodes[i]["train"]) + 4 * len(np.unique(labels[prep.nodes.nodes[i]["train"]]))  # real + 4/class
    assert (q, steps) == (pytest.approx(min(1.0, 4 / n)), int(np.ceil(n / 4)))  # batch 4, 1 epoch, 1 round
    want = max(dpa.pld.PLDAccountant().compose(dpa.ComposedDpEvent([
        gauss(min(1.0, 8 / c), 1.1, 2 * int(np.ceil(c / 8)) * 2), gauss(q, 1.1, steps)])).get_epsilon(heads["delta"])
        for c in np.unique(labels[prep.nodes.nodes[i]["train"]], return_counts=True)[1])
    assert eps == pytest.approx(want, rel=1e-6) and eps > gen_dp["epsilon_per_node"][i]
  # heads on synthetic features only, no DP keys: the run states the generators' guarantee (post-processing)
  only = train_and_evaluate(_cfg(tmp_path, "dp4", *RUN2, "train_on_real_features=false"), verbose=False,
                            prepared=prep)
  assert only["dp"]["epsilon_per_node"] == gen_dp["epsilon_per_node"] and "inherited_from" in only["dp"]

  plain = _cfg(tmp_path, "plain1", *RUN1, gens="plain")
  train_and_evaluate(plain, verbose=False, prepared=prep)
  with pytest.raises(grn.GeneratorRunError, match="'dp_require_generators' is true but the generators of round 2 "
                                                  "were trained without DP"):
    start_pretrained(_cfg(tmp_path, "p2", *RUN2, "dp_require_generators=true", gens="plain"), prep, verbose=False)
  start_pretrained(_cfg(tmp_path, "p3", *RUN2, gens="plain"), prep, verbose=True)
  assert "trained WITHOUT differential privacy" in capsys.readouterr().out
  with pytest.raises(privacy.PrivacyError, match="restored generators were trained without DP"):
    train_and_evaluate(_cfg(tmp_path, "p4", *RUN2, *DP, gens="plain"), verbose=False, prepared=prep)
  # a DP Run 1 cannot resume from generators trained without DP
  with pytest.raises(grn.GeneratorRunError, match="cannot resume from generators trained without DP"):
    train_and_evaluate(_cfg(tmp_path, "plain1", *[k for k in RUN1 if k != "global_rounds=2"], "global_rounds=3",
                            *DP, gens="plain"), resume=True, verbose=False, prepared=prep)
