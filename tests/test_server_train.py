"""Run 2's server side: aggregation of synthetic samples, class means, the global-training step vs an
independent computation, node-output targets, the trainer's server step end to end and resumed."""


import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from a2v_jax import config
from a2v_jax.config import ConfigError
from a2v_jax.generators import runs as grn
from a2v_jax.federated import server_train as st
from a2v_jax.federated.local import Shared
from a2v_jax.models.heads import make_heads
from a2v_jax.run.trainer import RUN_ONCE_COMPILER_OPTIONS, start_pretrained, train_and_evaluate
from tests.fakes import synthetic_prepared
from tests.test_generator_runs import RUN1, _cfg, _rows

GLOBAL = ["use_pretrained_generators=true", "global_model_train=true", "train_on_synthetic_features=false",
          "global_model_train_epochs=2", "global_model_train_learning_rate=0.01", "synthetic_samples_per_class=\"5\""]


def test_aggregation_counts_per_class_across_nodes():
  counts = np.array([[10, 0, 10], [10, 4, 0], [10, 0, 0]])
  row, lines = st.aggregate_counts(counts, ["dog", "rain", "car"])
  assert row == {"server/synthetic_samples_total": 44, "server/synthetic_samples_classes": 3}
  assert lines[0] == "server: Aggregated 44 synthetic samples across 3 classes from 3 node(s)"
  assert lines[1:] == ["  - dog: 30 samples (10 per node x 3 node(s))", "  - rain: 4 samples (4 per node x 1 node(s))",
                       "  - car: 10 samples (10 per node x 1 node(s))"]
  assert st.aggregate_counts(np.array([[3, 0], [5, 0]]), ["a", "b"])[1][1] == "  - a: 8 samples (from 2 node(s))"


@pytest.mark.parametrize("participate", [[True, True, True], [True, False, True], [False, True, False, False]])
def test_aggregate_gathers_the_participants_rows_per_class_like_numpy(participate):
  """Nodes with different class sets (node 0: classes 0, 1; node 1: 2; node 2: 1, 3), synthetic rows then
  class-mean rows; the jitted gather against a numpy boolean gather of the same rows, per participation
  mask (the last one padded with a client that holds nothing)."""
  rng = np.random.default_rng(0)
  nodes = np.array([0] * 5 + [1] * 3 + [2] * 4 + [0, 0, 1, 2, 2])
  labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 1, 3, 3, 3, 0, 1, 2, 1, 3])
  synthetic = np.arange(len(nodes)) < 12
  indices = rng.permutation(100)[:len(nodes)]
  agg = st.make_aggregate(indices, nodes, labels, synthetic, num_classes=5, multiple=4)
  idx, count, per_class = jax.tree.map(np.asarray, agg(np.asarray(participate)))
  take = np.asarray(participate)[nodes]
  assert idx.shape == (20,) and int(count) == take.sum()
  np.testing.assert_array_equal(idx[:count], indices[take])
  np.testing.assert_array_equal(per_class, np.bincount(labels[take & synthetic], minlength=5))


def test_class_means_are_each_nodes_mean_feature_per_class():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(12, 3, 2)).astype(np.float32)
  labels = np.array([0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1, 0])
  rows = [np.array([0, 1, 2, 4]), np.array([5, 6, 7, 8, 11])]
  means, lab, node = st.class_means(feats, labels, rows)
  assert lab.tolist() == [0, 1, 0, 1, 2] and node.tolist() == [0, 0, 1, 1, 1]
  expect = [feats[[0, 2]].mean(0), feats[[1, 4]].mean(0), feats[[6, 11]].mean(0), feats[[5]].mean(0),
            feats[[7, 8]].mean(0)]
  np.testing.assert_allclose(means, np.stack(expect), rtol=1e-6)


@pytest.fixture(scope="module")
def heads():
  cfg = config.load(None, ["batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2",
                           "global_model_train_epochs=1", "global_model_train_learning_rate=0.01",
                           "use_pretrained_generators=true", "global_model_train=true"])
  h = make_heads(cfg, {"clip": (4,), "t5": (3, 6)})
  apply_fn = lambda p, x: h.apply({"params": p}, x.astype(jnp.float32))
  x = jnp.zeros((1, 6, 8))
  params = jax.jit(lambda k: h.init(k, x)["params"]).lower(jax.random.key(1)).compile(
      compiler_options=RUN_ONCE_COMPILER_OPTIONS)(jax.random.key(1))
  return cfg, apply_fn, params


def test_server_step_is_one_adamw_step_on_the_aggregated_rows(heads):
  """One epoch over 4 rows of batch 4 = one step: AdamW's first update, -lr (g / (|g| + eps) + wd p),
  with g the gradient of the summed per-branch MSE to the class targets over the rows (order-free)."""
  cfg, apply_fn, params = heads
  rng = np.random.default_rng(1)
  feats = jnp.asarray(rng.normal(size=(10, 6, 8)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3, 0, 1], jnp.int32)
  table = {"clip": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32),
           "t5": jnp.asarray(rng.normal(size=(4, 3, 6)), jnp.float32)}
  idx = np.array([7, 2, 9, 4, 0, 0, 0, 0], np.int32)  # 4 valid rows, then padding
  train = st.make_server_train(cfg, apply_fn, 4)
  out, metrics = train(params, jnp.asarray(idx), 4, Shared(feats, labels, table), jax.random.key(3))
  rows = idx[:4]

  def loss(p):
    pred = apply_fn(p, feats[rows])
    return sum(jnp.mean(jnp.square(pred[b].reshape(4, -1) - table[b][labels[rows]].reshape(4, -1)))
               for b in ("clip", "t5"))
  grads = jax.grad(loss)(params)
  lr = 0.01
  for b in ("clip", "t5"):
    wd = getattr(cfg.train, f"{b}_adapter_weight_decay")
    want = jax.tree.map(lambda p, g: np.asarray(p) - lr * (np.asarray(g) / (np.abs(np.asarray(g)) + 1e-8)
                                                           + wd * np.asarray(p)), params[b], grads[b])
    jax.tree.map(lambda a, w: np.testing.assert_allclose(np.asarray(a), w, rtol=1e-4, atol=1e-6), out[b], want)
  pred = apply_fn(params, feats[rows])
  clip0 = float(np.mean(np.square(np.asarray(pred["clip"]) - np.asarray(table["clip"])[np.asarray(labels)[rows]])))
  assert float(metrics["clip_loss"]) == pytest.approx(clip0, rel=1e-4)  # the loss of the step's batch


def test_node_targets_are_per_class_means_of_the_nodes_outputs(heads):
  cfg, apply_fn, params = heads
  rng = np.random.default_rng(2)
  clients = jax.tree.map(lambda a: np.asarray(a) + 0.3 * rng.normal(size=(3,) + a.shape).astype(np.float32), params)
  feats = jnp.asarray(rng.normal(size=(12, 6, 8)), jnp.float32)
  labels = np.array([0, 0, 1, 1, 0, 2, 2, 0, 1, 1, 1, 0], np.int32)
  text = {"clip": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32),
          "t5": jnp.asarray(rng.normal(size=(4, 3, 6)), jnp.float32)}
  idx = np.array([[0, 1, 2, 3], [4, 5, 6, 0], [8, 9, 10, 11]], np.int32)
  count = np.array([4, 3, 3], np.int32)  # node 1's last entry and node 2's 11 are padding
  got = st.make_node_targets(apply_fn, 4)(clients, jnp.asarray(idx), jnp.asarray(count),
                                           Shared(feats, jnp.asarray(labels), text))
  predict = jax.jit(apply_fn)
  per_node = [predict(jax.tree.map(lambda a: a[c], clients), feats) for c in range(3)]
  for b in ("clip", "t5"):
    want = np.array(text[b])  # class 3: no node holds it -> its text target
    for k in range(3):
      means = [np.asarray(per_node[c][b])[[r for r in idx[c][:count[c]] if labels[r] == k]].mean(0)
               for c in range(3) if any(labels[r] == k for r in idx[c][:count[c]])]
      want[k] = np.mean(means, axis=0)
    np.testing.assert_allclose(np.asarray(got[b]), want, rtol=1e-4, atol=1e-5)


def test_global_training_needs_generators_and_its_own_switch():
  with pytest.raises(ConfigError, match="'global_model_train'.*use_pretrained_generators"):
    config.load(None, ["global_model_train=true"])
  with pytest.raises(ConfigError, match="global_model_train_from_nodes_adapters.*off"):
    config.load(None, ["global_model_train_from_nodes_adapters=true"])
  with pytest.raises(ConfigError, match="used by nobody"):
    config.load(None, ["use_pretrained_generators=true", "train_on_synthetic_features=false"])
  with pytest.raises(ConfigError, match="needs a global model"):
    config.load(None, GLOBAL + ['adapter_aggregation_mode="none"'])


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("gt_run1")
  prep = synthetic_prepared()
  train_and_evaluate(_cfg(tmp, "r1", *RUN1, "shared_generator_in_only_mode=false", "global_rounds=1"),
                     verbose=False, prepared=prep)
  return tmp, prep


def test_run2_server_step_end_to_end_and_resumed(run1, capsys):
  """Nodes train on real rows only; after FedAvg the server trains on every node's synthetic rows + the
  class means. Recomputed from the saved round-2 state: server = server step of the clients' mean on
  round 2's synthetic rows. A run stopped after round 1 and resumed logs the same rows."""
  tmp, prep = run1
  cfg = _cfg(tmp, "r2", *GLOBAL, "global_rounds=2", "eval_gap=1", "checkpoint_frequency=1")
  staged, gens = start_pretrained(cfg, prep, verbose=True)
  out = capsys.readouterr().out
  counts = grn.synthetic_counts(cfg, prep.nodes)
  assert f"server: Aggregated {counts.sum()} synthetic samples across 4 classes from 3 node(s)" in out
  for n, node in enumerate(staged.nodes.nodes):  # nodes: real train rows only
    np.testing.assert_array_equal(node["train"], prep.nodes.nodes[n]["train"])
  rows = gens.rows
  n_means = sum(len(np.unique(prep.nodes.clipset.labels[n["train"]])) for n in prep.nodes.nodes)
  assert (rows.mean_offset, rows.mean_count, rows.offset, rows.count) == (
      len(prep.features), n_means, len(prep.features) + n_means, counts.sum())
  train_and_evaluate(cfg, verbose=False, prepared=prep)
  logged = _rows(tmp / "r2")
  assert logged[-1]["server/global_train_samples"] == counts.sum() + n_means
  assert logged[-1]["server/synthetic_samples_total"] == counts.sum()

  mgr = ocp.CheckpointManager(tmp / "r2" / "state", item_names=("state", "meta"))
  state = mgr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mgr.close()
  clients, server = jax.tree.map(np.asarray, (state["clients"]["params"], state["server"]["params"]))
  mean = jax.tree.map(lambda a: a.mean(0), clients)  # uniform FedAvg, server sgd(1.0)
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prep.targets.items()})
  apply_fn = lambda p, x: heads.apply({"params": p}, x.astype(jnp.float32))
  feats = np.array(staged.features)
  feats[rows.offset:] = grn.redraw_synthetic(cfg, gens.state, gens.scale, gens.counts, gens.length, 2)
  idx = np.zeros((-(-len(rows.server_indices()) // 4) * 4,), np.int32)
  idx[:len(rows.server_indices())] = rows.server_indices()
  shared = Shared(jnp.asarray(feats), jnp.asarray(staged.nodes.clipset.labels), prep.targets)
  want, _ = st.make_server_train(cfg, apply_fn, len(rows.server_indices()))(
      mean, jnp.asarray(idx), len(rows.server_indices()), shared, st.server_key(cfg, 2))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-6), server, want)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.abs(a - b) > 1e-6)), server, mean)
  assert all(jax.tree.leaves(changed))  # the server step moved every leaf away from the FedAvg mean

  split = _cfg(tmp, "r2_split", *GLOBAL, "global_rounds=1", "eval_gap=1", "checkpoint_frequency=1")
  train_and_evaluate(split, verbose=False, prepared=prep)
  train_and_evaluate(_cfg(tmp, "r2_split", *GLOBAL, "global_rounds=2", "eval_gap=1", "checkpoint_frequency=1"),
                     resume=True, verbose=False, prepared=prep)
  drop = lambda rs: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rs]
  assert drop(_rows(tmp / "r2_split")) == drop(logged)


def test_sampled_rounds_aggregate_only_the_participants_samples(run1):
  """join_ratio < 1: each round's server/synthetic_samples_total is what the round's sampled nodes (those
  with a training loss) hold; the sample changes between rounds, so the totals follow it. Run with the nodes'
  own per-class outputs as targets (global_model_train_from_nodes_adapters): its losses are finite."""
  tmp, prep = run1
  cfg = _cfg(tmp, "r2s", *GLOBAL, "join_ratio=0.67", "global_rounds=6", "eval_gap=0",
             "global_model_train_from_nodes_adapters=true")
  train_and_evaluate(cfg, verbose=False, prepared=prep)
  per_node = grn.synthetic_counts(cfg, prep.nodes)  # (C, K)
  seen = set()
  for row in _rows(tmp / "r2s"):
    took = np.array([row[f"train/node_{i}/clip_loss"] != 0.0 for i in range(3)])
    seen.add(tuple(took))
    assert took.sum() == 2
    assert row["server/synthetic_samples_total"] == per_node[took].sum()
    assert row["server/synthetic_samples_classes"] == (per_node[took].sum(0) > 0).sum()
    n_means = sum(len(np.unique(prep.nodes.clipset.labels[prep.nodes.nodes[i]["train"]])) for i in np.flatnonzero(took))
    assert row["server/global_train_samples"] == per_node[took].sum() + n_means
    assert np.isfinite(row["server/global_train_clip_loss"]) and np.isfinite(row["server/global_train_t5_loss"])
  assert len(seen) > 1
