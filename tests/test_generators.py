"""Generators: models, losses vs numpy, vmapped training vs loops, sampling, orbax checkpoints.

Tiny shapes throughout; the training tests share one spec (and so one compiled program) where they can.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2v_jax.config import GeneratorConfig
from a2v_jax.generators import checkpoint as gc
from a2v_jax.generators import training as gt
from a2v_jax.models import generators as gen

C, N, T, D, K = 3, 8, 5, 6, 2
SIZES = (7, 3, 5)  # valid rows per node
BASE = dict(generator_hidden_dim=16, generator_latent_dim=4, generator_training_sequence_length=2,
            generator_batch_size=4, generator_training_epochs=3, generator_granularity="unified")


def cfg_of(**kw) -> GeneratorConfig:
  return GeneratorConfig(**{**BASE, **kw})


def node_data(seed=0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(C, N, T, D)).astype(np.float32)
  labels = rng.integers(0, K, size=(C, N))
  mask = np.zeros((C, N), bool)
  for c, n in enumerate(SIZES):
    mask[c, :n] = True
  return feats, labels, mask


def close(a, b, tol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol), a, b)


# ----------------------------------------------------------------------------------------------
# Token resampling, losses, sizes.


def test_pool_and_interpolate_match_torch_formulas():
  x = np.random.default_rng(0).normal(size=(2, 7, 3)).astype(np.float32)
  # adaptive_avg_pool1d: bin i = [floor(i L / S), ceil((i + 1) L / S))
  want = np.stack([x[:, int(np.floor(i * 7 / 3)):int(np.ceil((i + 1) * 7 / 3))].mean(1) for i in range(3)], 1)
  np.testing.assert_allclose(gen.pool_tokens(jnp.asarray(x), 3), want, rtol=1e-6)
  # F.interpolate(linear, align_corners=False): src = max((j + .5) * in / out - .5, 0)
  out = 11
  want = np.zeros((2, out, 3), np.float32)
  for j in range(out):
    src = max((j + 0.5) * 7 / out - 0.5, 0.0)
    i0 = min(int(src), 6)
    i1 = min(i0 + 1, 6)
    lam = src - i0
    want[:, j] = (1 - lam) * x[:, i0] + lam * x[:, i1]
  np.testing.assert_allclose(gen.interpolate_tokens(jnp.asarray(x), out), want, rtol=1e-5, atol=1e-6)
  assert gen.interpolate_tokens(jnp.asarray(x), 7) is not None


def test_vae_loss_matches_numpy():
  rng = np.random.default_rng(1)
  b, s, d, z, epochs = 5, 3, 4, 2, 10
  x_hat, x = rng.normal(size=(2, b, s, d))
  mu, logvar = rng.normal(size=(2, b, z)) * 2
  w = np.array([1, 1, 0, 1, 0], np.float32)
  for epoch in (0, 3, 9):
    total, parts = gen.vae_loss(*(jnp.asarray(a, jnp.float32) for a in (x_hat, x, mu, logvar)), epoch, epochs,
                                jnp.asarray(w))
    v = w.astype(bool)
    recon = ((x_hat - x) ** 2).reshape(b, -1).mean(1)[v].mean()
    kl = (-0.5 * (1 + logvar - mu ** 2 - np.exp(np.clip(logvar, -10, 10)))).mean(1)[v].mean()
    a, t = x_hat.reshape(b, -1) + 1e-8, x.reshape(b, -1) + 1e-8
    cos = (1 - (a * t).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(t, axis=1)))[v].mean()
    beta = min(0.01, 0.01 * (epoch + 1) / max(1, int(0.5 * epochs)))
    w_sim = max(0.01, 0.1 * (1 - epoch / epochs))
    np.testing.assert_allclose([parts["recon"], parts["kl"], parts["cos"], parts["beta"], parts["w_sim"], total],
                               [recon, kl, cos, beta, w_sim, recon + beta * kl + w_sim * cos], rtol=1e-5)


def test_gan_losses_are_bce_with_logits():
  real, fake = np.array([2.0, -1.0, 0.5]), np.array([-3.0, 0.2, 1.0])
  _, p = gen.gan_losses(jnp.asarray(real), jnp.asarray(fake))
  bce = lambda logit, y: -(y * np.log(1 / (1 + np.exp(-logit))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-logit))))
  np.testing.assert_allclose(p["d_loss"], (bce(real, 1) + bce(fake, 0)).mean(), rtol=1e-5)
  np.testing.assert_allclose(p["g_loss"], bce(fake, 1).mean(), rtol=1e-5)


def test_reference_shape_generator_is_50x_smaller():
  ours = gen.vae_param_count(1214, 768, 1024, 256)
  ref = gen.reference_vae_param_count(1214, 768, 1024, 256)
  assert 1.90e9 < ref < 1.92e9  # spec 5.2: "~1.91 B"
  assert ref / ours >= 50, (ours, ref)
  assert gen.reference_vae_param_count(4, 768) == pytest.approx(9.2e6, rel=0.01)


def test_model_shapes_and_sample_path():
  # Shapes only (eval_shape): a conditioned VAE with the reference preset and a GAN pair.
  cvae = gen.ConditionedVAEGenerator()
  x = jax.ShapeDtypeStruct((3, 4, 512), jnp.float32)
  cond = jax.ShapeDtypeStruct((3, 768), jnp.float32)
  params = jax.eval_shape(cvae.init, jax.random.key(0), x, jax.ShapeDtypeStruct((3, 256), jnp.float32), cond)
  out = jax.eval_shape(lambda p, k, c: gen.sample(cvae, p, k, 3, c, target_length=10), params, jax.random.key(1),
                       cond)
  assert out.shape == (3, 10, 512)
  g, d = gen.GANGenerator(6, 8, 3, 2), gen.GANDiscriminator(8, 2)
  pg = jax.eval_shape(g.init, jax.random.key(0), jax.ShapeDtypeStruct((5, 3), jnp.float32))
  assert jax.eval_shape(lambda p, k: gen.sample(g, p, k, 5), pg, jax.random.key(0)).shape == (5, 2, 6)
  pd = jax.eval_shape(d.init, jax.random.key(0), jax.ShapeDtypeStruct((5, 2, 6), jnp.float32))
  assert jax.eval_shape(d.apply, pd, jax.ShapeDtypeStruct((5, 2, 6), jnp.float32)).shape == (5,)
  with pytest.raises(ValueError, match="condition"):
    jax.eval_shape(cvae.init, jax.random.key(0), x, jax.ShapeDtypeStruct((3, 256), jnp.float32))


# ----------------------------------------------------------------------------------------------
# Layouts and bookkeeping (host side, no compile).


def test_layouts_per_granularity():
  labels = np.array([[0, 1, 2, 0], [2, 2, 2, 2]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  names = ["dog", "cat", "car"]
  lay = gt.make_layout(cfg_of(generator_granularity="per_class"), labels, mask, 3, class_names=names)
  assert lay.keys == ("dog", "cat", "car") and lay.num_slots == 4  # node 0: 3 classes, node 1: 'car'
  assert [(d["node"], d["key"]) for d in lay.describe()] == [(0, "dog"), (0, "cat"), (0, "car"), (1, "car")]
  groups = {"animals": ["dog", "cat"]}
  lay = gt.make_layout(cfg_of(generator_granularity="per_group", generator_class_groups=groups), labels, mask, 3,
                       class_names=names)
  assert lay.keys == ("animals", "other") and lay.class_to_key == (0, 0, 1)
  assert list(zip(lay.slot_node, lay.slot_key)) == [(0, 0), (0, 1), (1, 1)]
  shared = cfg_of(generator_granularity="per_class", use_generator=True, generator_only_mode=True)
  lay = gt.make_layout(shared, labels, mask, 3)
  assert lay.shared and lay.slot_node == (-1, -1, -1) and lay.slot_key == (0, 1, 2)
  counts = gt.synthetic_counts(cfg_of(), labels, mask, 3)
  np.testing.assert_array_equal(counts, [[1, 1, 1], [0, 0, 2]])  # 'auto' = rows // classes present
  np.testing.assert_array_equal(gt.synthetic_counts(cfg_of(synthetic_samples_per_class="5"), labels, mask, 3),
                                [[5, 5, 5], [0, 0, 5]])


def _walk(spec, layout, calls, epochs=3):
  """Runs _bookkeeping over successive calls; calls: per call, per (slot, visit) a list of labels."""
  g, v = layout.num_slots, (layout.num_nodes if layout.shared else 1)
  seen, epoch = np.zeros((g, spec.num_classes), bool), np.zeros(g, np.int32)
  node_seen = np.zeros((layout.num_nodes, spec.num_classes), bool)
  out = []
  for call in calls:
    lab, msk = np.zeros((g, v, 4), np.int32), np.zeros((g, v, 4), np.float32)
    for (s, j), labels in call.items():
      lab[s, j, :len(labels)], msk[s, j, :len(labels)] = labels, 1
    start, reset, epoch, seen, node_seen = gt._bookkeeping(spec, layout, seen, epoch, node_seen, msk, lab, epochs)
    out.append(dict(start=start, reset=reset, epoch=epoch.copy(), seen=seen.copy(), node_seen=node_seen.copy()))
  return out


def test_reset_tracks_classes_per_node_and_a_first_visit_is_no_change():
  """Seed 003's rule on a shared unified generator visited by three nodes: nodes' first trainings
  ({0}, {0, 1}, {1}) reset nothing (the generator ends up knowing every node's classes, not only the
  last node's); the reset comes when node 2, which trained before, brings class 0 it never trained."""
  spec = gt.GeneratorSpec.from_config(cfg_of(reset_generator_on_class_change=True), (T, D), 3)
  shared = gt.SlotLayout("unified", True, ("all",), (0, 0, 0), (-1,), (0,), 3)
  first = {(0, 0): [0, 0], (0, 1): [0, 1], (0, 2): [1, 1]}
  a, b = _walk(spec, shared, [first, {**first, (0, 2): [1, 0]}])
  assert not a["reset"].any() and a["seen"].tolist() == [[True, True, False]] and a["epoch"].tolist() == [9]
  np.testing.assert_array_equal(a["start"], [[0, 3, 6]])
  assert a["node_seen"].tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]
  np.testing.assert_array_equal(b["reset"], [[False, False, True]])
  assert b["epoch"].tolist() == [3] and b["seen"].tolist() == [[True, True, False]]
  off = dataclasses.replace(spec, reset_on_new_class=False)  # the default: keep learning
  assert not any(r["reset"].any() for r in _walk(off, shared, [first, {**first, (0, 2): [1, 0]}]))
  assert gt.GeneratorSpec.from_config(cfg_of(), (T, D), 3).reset_on_new_class is False


def test_reset_per_class_and_per_group_touch_only_the_new_classes_generators():
  spec = gt.GeneratorSpec.from_config(cfg_of(reset_generator_on_class_change=True), (T, D), 3)
  # per_class, shared: node 0 trains dog (0) and rooster (1), node 1 dog; then node 1 brings rooster too
  per_class = gt.SlotLayout("per_class", True, ("dog", "rooster", "car"), (0, 1, 2), (-1, -1), (0, 1), 2)
  r1 = {(0, 0): [0, 0], (1, 0): [1], (0, 1): [0]}
  _, b = _walk(spec, per_class, [r1, {**r1, (1, 1): [1, 1]}])
  np.testing.assert_array_equal(b["reset"], [[False, False], [False, True]])  # rooster's generator only
  assert b["epoch"].tolist() == [12, 3]  # dog: 4 visits in a row; rooster restarted at node 1's visit
  # per_group, per node: {dog, rooster} = animals, car = other; node 0 trains dog, then dog + rooster + car
  groups = gt.SlotLayout("per_group", False, ("animals", "other"), (0, 0, 1), (0, 0), (0, 1), 1)
  a, b = _walk(spec, groups, [{(0, 0): [0]}, {(0, 0): [0, 1], (1, 0): [2]}])
  assert not a["reset"].any()
  # animals had trained and gets a new class: reset; other is fresh (never trained): nothing to reset
  np.testing.assert_array_equal(b["reset"], [[True], [False]])
  assert b["epoch"].tolist() == [3, 3] and b["node_seen"].tolist() == [[True, True, True]]


# ----------------------------------------------------------------------------------------------
# Training.


@pytest.fixture(scope="module")
def unified():
  """A unified VAE run: the vmap backend after two calls, the data, and the layout."""
  cfg = cfg_of()
  feats, labels, mask = node_data()
  lay = gt.make_layout(cfg, labels, mask, K)
  state = gt.init_generators(jax.random.key(0), cfg, lay, (T, D), K)
  state, m1 = gt.train_generators(state, feats, labels, mask, jax.random.key(1))
  state, m2 = gt.train_generators(state, feats, labels, mask, jax.random.key(2))
  return dict(cfg=cfg, data=(feats, labels, mask), layout=lay, state=state, metrics=(m1, m2))


def test_vmapped_equals_looped_and_compiles_once(unified):
  cfg, lay, (feats, labels, mask) = unified["cfg"], unified["layout"], unified["data"]
  assert lay.num_slots == C
  state = gt.init_generators(jax.random.key(0), cfg, lay, (T, D), K)
  for k in (1, 2):
    state, _ = gt.train_generators(state, feats, labels, mask, jax.random.key(k), backend="loop")
  close(state.params, unified["state"].params)
  close(state.opt_state, unified["state"].opt_state)
  assert unified["state"].epoch.tolist() == [6, 6, 6]
  m1, _ = unified["metrics"]
  assert m1["loss"].shape == (C, 1, 3) and m1["rows"].tolist() == [[7], [3], [5]]
  spec = unified["state"].spec
  assert gt._compiled_train(spec, 3, "vmap", False)._cache_size() == 1  # second call compiled nothing


def test_padded_rows_are_irrelevant(unified):
  cfg, lay, (feats, labels, mask) = unified["cfg"], unified["layout"], unified["data"]
  garbage = feats.copy()
  garbage[~mask] = np.nan  # padded rows never enter a loss
  wild = np.where(mask, labels, 1 - labels)
  state = gt.init_generators(jax.random.key(0), cfg, lay, (T, D), K)
  for k in (1, 2):
    state, _ = gt.train_generators(state, garbage, wild, mask, jax.random.key(k))
  close(state.params, unified["state"].params)
  # node 1 alone (3 rows, padded to 4 rather than 8, no other slots) trains to the same generator
  one = gt.SlotLayout("unified", False, ("all",), (0, 0), (0,), (0,), 1)
  alone = gt.init_generators(jax.random.key(0), cfg, one, (T, D), K)
  sub = lambda a: a[1:2, :4]
  fn = gt.make_slot_trainer(alone.spec, 3)
  carry = jax.tree.map(lambda a: a[0], (alone.params, alone.opt_state))
  idx, msk, lab = gt._plan(one, sub(labels).reshape(-1), [np.arange(3)], K, 4)
  pool = gen.pool_tokens(jnp.asarray(sub(feats).reshape(-1, T, D)), 2)
  for k in (1, 2):
    # visit id 1: slot 1 of the 3-slot run drew its visit key from fold_in(key, 1)
    carry, _ = jax.jit(fn)(carry, pool, idx[0], msk[0], lab[0], jnp.array([1]), jnp.array([3 * (k - 1)]),
                           jnp.zeros(1, bool), None, jax.random.key(k), alone.cond_table)
  close(carry[0], jax.tree.map(lambda a: a[1], unified["state"].params))


def test_shared_mode_equals_sequential_loop(unified):
  cfg = cfg_of(use_generator=True, generator_only_mode=True, shared_generator_in_only_mode=True)
  feats, labels, mask = unified["data"]
  lay = gt.make_layout(cfg, labels, mask, K)
  assert lay.shared and lay.num_slots == 1
  state = gt.init_generators(jax.random.key(0), cfg, lay, (T, D), K)
  trained, metrics = gt.train_generators(state, feats, labels, mask, jax.random.key(1))
  assert metrics["loss"].shape == (1, C, 3)
  # the same param set and AdamW state threaded through the nodes one after another, by hand
  state = gt.init_generators(jax.random.key(0), cfg, lay, (T, D), K)
  fn = gt._compiled_train(state.spec, 3, "loop", False)  # one visit per call
  carry = jax.tree.map(lambda a: a[0], (state.params, state.opt_state))
  pool = gen.pool_tokens(jnp.asarray(feats.reshape(-1, T, D)), 2)
  for n in range(C):
    rows = n * N + np.arange(SIZES[n])
    idx = np.zeros((1, 8), np.int32)
    idx[0, :len(rows)] = rows
    msk = (np.arange(8) < len(rows)).astype(np.float32)[None]
    lab = np.where(msk > 0, labels.reshape(-1)[idx], 0).astype(np.int32)
    carry, _ = fn(carry, pool, idx, msk, lab, np.array([n], np.int32), np.array([3 * n], np.int32),
                  np.zeros(1, bool), None, jax.random.key(1), state.cond_table)
  close(carry[0], jax.tree.map(lambda a: a[0], trained.params))
  assert trained.epoch.tolist() == [9]


def test_reset_on_new_class_restarts_only_the_affected_slots(unified):
  lay, (feats, labels, mask) = unified["layout"], unified["data"]
  cfg = cfg_of(reset_generator_on_class_change=True)
  state = gt.init_generators(jax.random.key(0), cfg, lay, (T, D), K)
  state, _ = gt.train_generators(state, feats, np.zeros_like(labels), mask, jax.random.key(1))  # class 0 only
  later = labels.copy()
  later[2] = 0  # class 1 appears on nodes 0 and 1 only
  state, m = gt.train_generators(state, feats, later, mask, jax.random.key(2))
  assert np.asarray(m["reset"])[:, 0].tolist() == [True, True, False]
  assert state.epoch.tolist() == [3, 3, 6] and np.asarray(state.seen).tolist() == [[1, 1], [1, 1], [1, 0]]
  # a reset slot is exactly a fresh generator (drawn from fold_in(key, RESET_SALT)) trained on this call's data
  fresh = gt.init_generators(jax.random.fold_in(jax.random.key(2), gt.RESET_SALT), cfg, lay, (T, D), K)
  fresh, _ = gt.train_generators(fresh, feats, later, mask, jax.random.key(2))
  close(jax.tree.map(lambda a: a[:2], state.params), jax.tree.map(lambda a: a[:2], fresh.params))


def test_sampling_errors(unified):
  state = unified["state"]
  counts = np.array([[2, 1], [1, 0], [0, 3]])
  with pytest.raises(ValueError, match="unconditioned and was trained on"):
    gt.sample_generators(state, jax.random.key(0), counts)
  with pytest.raises(ValueError, match=r"counts must be \(nodes, classes\)"):
    gt.sample_generators(state, jax.random.key(0), counts[:2])


def test_toy_clusters_loss_decreases_and_synthetic_trains_a_classifier():
  """per_class VAEs on separated Gaussian clusters: samples of class c land nearest class c's real points."""
  rng = np.random.default_rng(3)
  k, nodes, per_class, d = 3, 2, 16, 8
  means = rng.normal(size=(k, 2, d)) * 3
  def draw(n):
    lab = np.repeat(np.arange(k), n)
    return (means[lab] + 0.3 * rng.normal(size=(len(lab), 2, d))).astype(np.float32), lab
  x, y = zip(*[draw(per_class) for _ in range(nodes)])
  feats, labels, mask = np.stack(x), np.stack(y), np.ones((nodes, k * per_class), bool)
  cfg = cfg_of(generator_granularity="per_class", generator_hidden_dim=32, generator_latent_dim=4,
               generator_batch_size=8, generator_training_epochs=30, generator_learning_rate=1e-2,
               generator_augmentation_noise=0.05)
  lay = gt.make_layout(cfg, labels, mask, k)
  assert lay.num_slots == nodes * k
  state = gt.init_generators(jax.random.key(0), cfg, lay, (2, d), k)
  state, m = gt.train_generators(state, feats, labels, mask, jax.random.key(1))
  recon = np.asarray(m["recon"])[:, 0]
  assert (recon[:, -3:].mean(1) < 0.5 * recon[:, :3].mean(1)).all(), recon
  counts = np.full((nodes, k), 20)
  syn, syn_y, valid = gt.sample_generators(state, jax.random.key(2), counts)
  syn, syn_y = np.asarray(syn)[np.asarray(valid)].reshape(-1, 2 * d), np.asarray(syn_y)[np.asarray(valid)]
  centroids = np.stack([syn[syn_y == c].mean(0) for c in range(k)])
  test_x, test_y = draw(20)
  pred = np.argmin(((test_x.reshape(len(test_y), 1, -1) - centroids) ** 2).sum(-1), 1)
  assert (pred == test_y).mean() >= 0.9


def test_conditioned_per_group_samples_the_requested_classes():
  feats, labels, mask = node_data(1)
  groups = {"g": [0]}  # class 1 -> 'other'
  cfg = cfg_of(generator_type="cvae", generator_condition="onehot", generator_granularity="per_group", generator_class_groups=groups,
               generator_training_epochs=2)
  lay = gt.make_layout(cfg, labels, mask, K)
  state = gt.init_generators(jax.random.key(0), cfg, lay, (T, D), K)
  assert state.spec.conditioned and lay.keys == ("g", "other")
  state, m = gt.train_generators(state, feats, labels, mask, jax.random.key(1))
  assert np.isfinite(np.asarray(m["loss"])).all()
  counts = gt.synthetic_counts(cfg, labels, mask, K)
  x, y, v = gt.sample_generators(state, jax.random.key(2), counts, target_length=T + 2)
  assert x.shape == (C, counts.sum(1).max(), T + 2, D) and np.isfinite(np.asarray(x)).all()
  for n in range(C):  # a node's rows: its classes in order, counts[n, c] of each, then padding
    want = np.repeat(np.arange(K), counts[n])
    np.testing.assert_array_equal(np.asarray(y)[n][np.asarray(v)[n]], want)
    assert not np.asarray(v)[n][len(want):].any()


def test_gan_trains():
  feats, labels, mask = node_data(1)
  gan = cfg_of(generator_type="gan", generator_training_epochs=2)
  state = gt.init_generators(jax.random.key(0), gan, gt.make_layout(gan, labels, mask, K), (T, D), K)
  state, m = gt.train_generators(state, feats, labels, mask, jax.random.key(1))
  assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(m) and np.isfinite(np.asarray(m["loss"])).all()


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def test_checkpoint_roundtrip_latest_and_partial_rounds(unified, tmp_path):
  cfg = dataclasses.replace(unified["cfg"], generator_checkpoint_dir=str(tmp_path), generator_save_checkpoint=True,
                            generator_checkpoint_base_name="vae")
  state = unified["state"]
  for r in (2, 10, 9):
    gc.save_generators(cfg, state, r)
  root = tmp_path / "vae"
  assert (root / "latest").read_text().strip() == "round_00009"  # pointer = last written
  (root / "round_00011").mkdir()  # an interrupted later round: skipped
  (root / ".round_00012.tmp-x").mkdir()
  assert gc.scan_rounds(cfg)[0] == [2, 9, 10] and gc.latest_round(cfg) == 10
  restored, r = gc.restore_generators(cfg, feature_dim=D, num_classes=K)
  assert r == 10 and restored.layout == state.layout and restored.spec == state.spec
  close(restored.arrays(), state.arrays(), tol=0)
  manifest = json.loads((root / "round_00010" / "manifest.json").read_text())
  assert [(s["node"], s["key"], s["trained_classes"]) for s in manifest["slots"]] == \
      [(0, "all", [0, 1]), (1, "all", [0, 1]), (2, "all", [0, 1])]
  assert manifest["sequence_length"] == 2 and manifest["feature_dim"] == D and manifest["generator_type"] == "vae"
  every3 = dataclasses.replace(cfg, generator_checkpoint_frequency=3)
  assert [r for r in range(1, 12) if gc.should_save(every3, r, 11)] == [3, 6, 9, 11]
  with pytest.raises(gc.GeneratorCheckpointError, match="round 11 is not a complete"):
    gc.restore_generators(cfg, round_num=11)


# orbax leaves a tensorstore callback to a closed asyncio loop after failing on damaged files
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_errors_name_what_was_found(unified, tmp_path):
  cfg = dataclasses.replace(unified["cfg"], generator_checkpoint_dir=str(tmp_path))
  with pytest.raises(gc.GeneratorCheckpointError, match="no generator checkpoints at"):
    gc.restore_generators(cfg)
  state = unified["state"]
  gc.save_generators(cfg, state, 1)
  with pytest.raises(gc.GeneratorCheckpointError, match=r"hidden_dim: checkpoint has 16, expected 32"):
    gc.restore_generators(dataclasses.replace(cfg, generator_hidden_dim=32))
  with pytest.raises(gc.GeneratorCheckpointError, match=r"num_classes: checkpoint has 2, expected 3"):
    gc.restore_generators(cfg, num_classes=3)
  with pytest.raises(gc.GeneratorCheckpointError, match="feature_dim"):
    gc.restore_generators(cfg, feature_dim=D + 1)
  path = gc.round_dir(cfg, 1)
  # well-formed arrays with other values (another state's) under round 1's manifest: only its checksums tell
  other = dataclasses.replace(cfg, generator_checkpoint_base_name="other")
  gc.save_generators(other, state.replace(params=jax.tree.map(lambda a: a + 1.0, state.params)), 1)
  shutil.rmtree(path / "state")
  shutil.copytree(gc.round_dir(other, 1) / "state", path / "state")
  with pytest.raises(gc.GeneratorCheckpointError, match=r"generator checkpoint .*round_00001/state is corrupt: "
                                                       r"\d+ array\(s\) differ from what was saved, first params/"):
    gc.restore_generators(cfg)
  for f in (path / "state" / "d").iterdir():  # damaged array files
    f.write_bytes(b"garbage")
  with pytest.raises(gc.GeneratorCheckpointError, match="corrupt"):
    gc.restore_generators(cfg)
  (path / "manifest.json").write_text("{not json")
  with pytest.raises(gc.GeneratorCheckpointError, match="no complete round.*corrupt"):
    gc.restore_generators(cfg)
  shutil.rmtree(path)
  with pytest.raises(gc.GeneratorCheckpointError, match="no complete round"):
    gc.restore_generators(cfg)
