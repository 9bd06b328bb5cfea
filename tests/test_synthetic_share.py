"""Run 2's share of synthetic rows to the nodes (``server_synthetic_samples_per_class``): the counts a node
receives, the rows it trains on (classes it lacks, from the other participants only), the trainer's stage with
sampling, and ``--resume`` bit for bit."""

import jax
import numpy as np
import pytest

from a2v_jax import config
from a2v_jax.config import ConfigError
from a2v_jax.federated import synthetic_share as ss
from a2v_jax.generators import runs as grn
from a2v_jax.run.trainer import train_and_evaluate
from tests.fakes import synthetic_prepared
from tests.test_generator_runs import RUN1, _cfg, _rows


def test_receive_counts_top_each_class_up_to_the_balanced_count():
  labels = np.array([0] * 6 + [1] * 2 + [2] * 4 + [0, 1, 2, 3])
  rows = [np.arange(6), np.arange(6, 12), np.arange(12, 16)]  # node 0: six of class 0; node 1: 2 x c1, 4 x c2
  got = ss.receive_counts("auto", rows, labels, 4, num_clients=4)
  # auto = the node's rows / classes it holds: 6 / 1, 6 / 2, 4 / 4
  np.testing.assert_array_equal(got, [[0, 6, 6, 6], [3, 1, 0, 3], [0, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(ss.receive_counts(5, rows, labels, 4, 3), [[0, 5, 5, 5], [5, 3, 1, 5], [4, 4, 4, 4]])


def _case():
  """3 nodes: own rows 0..; synthetic rows 100.. of each node's classes (node 0: class 0, node 1: 1, node 2: 0 and 2)."""
  syn_nodes = np.array([0] * 8 + [1] * 8 + [2] * 4 + [2] * 4)
  syn_labels = np.array([0] * 8 + [1] * 8 + [0] * 4 + [2] * 4)
  syn_rows = 100 + np.arange(len(syn_nodes))
  base_idx = np.array([[0, 1, 2, 0], [3, 4, 0, 0], [5, 6, 7, 8]])
  base_count = np.array([3, 2, 4])
  receive = np.array([[0, 5, 5], [5, 0, 5], [0, 5, 0]])
  return base_idx, base_count, syn_rows, syn_nodes, syn_labels, receive


@pytest.mark.parametrize("participate", [[True, True, True], [True, False, True], [False, True, True]])
def test_a_node_trains_on_its_rows_plus_the_classes_it_lacks_from_other_participants(participate):
  base_idx, base_count, syn_rows, syn_nodes, syn_labels, receive = _case()
  share = ss.make_share(base_idx, base_count, syn_rows, syn_nodes, syn_labels, receive, width=16)
  idx, count, sent = jax.device_get(share(np.array(participate), ss.share_key(0, 3)))
  part = np.array(participate)
  for c in range(3):
    rows = idx[c, :count[c]]
    np.testing.assert_array_equal(rows[:base_count[c]], base_idx[c, :base_count[c]])  # own rows first, intact
    got = rows[base_count[c]:] - 100
    assert len(set(got)) == len(got)  # without replacement
    assert sent[c] == len(got)
    if not part[c]:
      assert len(got) == 0  # a node not sampled receives nothing
      continue
    assert np.all(syn_nodes[got] != c) and np.all(part[syn_nodes[got]])  # other participants' rows only
    for k in range(3):
      available = np.sum((syn_labels == k) & (syn_nodes != np.arange(3)[:, None])[c] & part[syn_nodes])
      assert np.sum(syn_labels[got] == k) == min(receive[c, k], available), (c, k)
  # each round draws other rows (a new key), the same key the same rows
  again = jax.device_get(share(np.array(participate), ss.share_key(0, 3)))
  np.testing.assert_array_equal(again[0], idx)
  other = jax.device_get(share(np.array(participate), ss.share_key(0, 4)))[0]
  if part.all():
    assert not np.array_equal(other, idx)


def test_the_key_needs_generators_and_federated_nodes():
  with pytest.raises(ConfigError, match="'server_synthetic_samples_per_class'.*use_pretrained_generators"):
    config.load(None, ['server_synthetic_samples_per_class="auto"'])
  run2 = ["use_pretrained_generators=true", "server_synthetic_samples_per_class=4"]
  with pytest.raises(ConfigError, match="'server_synthetic_samples_per_class'.*centralised"):
    config.load(None, run2 + ['adapter_aggregation_mode="centralised"'])
  with pytest.raises(ConfigError, match="'server_synthetic_samples_per_class' must be"):
    config.load(None, ["use_pretrained_generators=true", "server_synthetic_samples_per_class=0"])
  with pytest.raises(ConfigError, match="'server_synthetic_samples_per_class'"):
    config.load(None, ["use_pretrained_generators=true", 'server_synthetic_samples_per_class="many"'])
  # real rows + the shared ones: nodes need not train on their own synthetic rows
  config.load(None, run2 + ["train_on_synthetic_features=false"])


@pytest.fixture(scope="module")
def one_class_nodes(tmp_path_factory):
  """Run 1 on three skewed nodes: classes {0}, {1}, {2, 3}."""
  tmp = tmp_path_factory.mktemp("share_run1")
  prep = synthetic_prepared(node_classes=[[0], [1], [2, 3]])
  train_and_evaluate(_cfg(tmp, "r1", *RUN1, "shared_generator_in_only_mode=false", "global_rounds=1"),
                     verbose=False, prepared=prep)
  return tmp, prep


SHARE = ["use_pretrained_generators=true", "train_on_synthetic_features=false", 'synthetic_samples_per_class="6"',
         "server_synthetic_samples_per_class=5", "join_ratio=0.67", "eval_gap=1", "checkpoint_frequency=1",
         "seed=2"]


def test_sampled_rounds_share_only_between_participants_and_resume_bit_for_bit(one_class_nodes):
  """join_ratio 0.67 of 3 nodes: each round the 2 sampled nodes (those with a loss) receive, per class they
  lack, min(5, what the OTHER sampled node drew of it); the unsampled node receives nothing. A run stopped
  after round 2 and resumed logs the rows of a straight run."""
  tmp, prep = one_class_nodes
  cfg = _cfg(tmp, "share", *SHARE, "global_rounds=4")
  train_and_evaluate(cfg, verbose=False, prepared=prep)
  drawn = grn.synthetic_counts(cfg, prep.nodes)  # (C, K) synthetic rows each node draws (its classes: 6 each)
  receive = ss.receive_counts(5, [n["train"] for n in prep.nodes.nodes], prep.nodes.clipset.labels, 4, 3)
  logged = _rows(tmp / "share")
  samples = set()
  for row in logged:
    took = np.array([row[f"train/node_{i}/clip_loss"] != 0.0 for i in range(3)])
    samples.add(tuple(took))
    assert took.sum() == 2
    for c in range(3):
      others = took & (np.arange(3) != c)
      want = int(np.minimum(receive[c], drawn[others].sum(0)).sum()) if took[c] else 0
      assert row[f"train/node_{c}/received_synthetic_rows"] == want, (row["round"], c)
    assert row["server/shared_synthetic_rows"] == sum(row[f"train/node_{c}/received_synthetic_rows"] for c in range(3))
  assert len(samples) > 1 and any(r["server/shared_synthetic_rows"] > 0 for r in logged)

  train_and_evaluate(_cfg(tmp, "share_split", *SHARE, "global_rounds=2"), verbose=False, prepared=prep)
  train_and_evaluate(_cfg(tmp, "share_split", *SHARE, "global_rounds=4"), resume=True, verbose=False, prepared=prep)
  drop = lambda rs: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rs]
  assert drop(_rows(tmp / "share_split")) == drop(logged)
