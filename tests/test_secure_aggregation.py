"""Secure aggregation (Flower's SecAgg+, a2v_jax/deploy/secure.py), message for message in one process: the same
rows as plain FedAvg within SecAgg+'s quantisation, no node's heads ever reach the server, and clear refusals."""

import json

import numpy as np
import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[test]' or '.[flower]')")

from a2v_jax.deploy import flower_app  # noqa: E402
from tests.fakes import synthetic_prepared  # noqa: E402

CONFIG = "experiments/configs/fsdd_tiny.json"
SETTINGS = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2",
            "num_nodes=4", "global_rounds=2", "join_ratio=0.75", 'adapter_aggregation_mode="weighted"',
            "server_momentum=0.5", "seed=2", "eval_gap=1"]


@pytest.fixture(scope="module")
def prep():
  return synthetic_prepared(num_nodes=4, per_node=(24, 17, 30, 21))


def _rows(run_dir):
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path, prep, name, *extra, secure=None, monkeypatch=None):
  rc = {"config": CONFIG, "set": ";".join(SETTINGS + [f'output_dir="{tmp_path}"', f'name="{name}"', *extra]),
        **(secure or {})}
  replies = []
  if monkeypatch is not None:  # every reply a node sends the server
    deliver = flower_app.InProcessGrid._deliver

    def spy(self, msg):
      reply = deliver(self, msg)
      replies.append((msg, reply))
      return reply
    monkeypatch.setattr(flower_app.InProcessGrid, "_deliver", spy)
  flower_app.run_in_process(rc, 4, client=flower_app.make_client_app(lambda cfg: prep),
                            server=flower_app.make_server_app(verbose=False))
  return replies


def _train_replies(replies):
  return [r for m, r in replies if m.metadata.message_type == "train" and r is not None and not r.has_error()]


@pytest.mark.parametrize("mode", ["weighted", "avg"])
def test_secure_rounds_equal_plain_fedavg_and_the_server_never_holds_a_node_s_heads(tmp_path, prep, monkeypatch,
                                                                                     mode):
  extra = [f'adapter_aggregation_mode="{mode}"']
  plain = _run(tmp_path, prep, "plain", *extra, monkeypatch=monkeypatch)
  monkeypatch.undo()
  masked = _run(tmp_path, prep, "secure", *extra, secure={"secure-aggregation": "true"}, monkeypatch=monkeypatch)
  want, got = _rows(tmp_path / "plain"), _rows(tmp_path / "secure")
  assert len(got) == len(want) == 2
  for w, g in zip(want, got):
    keys = {k for k in w if k.startswith(("train/", "test/"))}
    assert keys == {k for k in g if k.startswith(("train/", "test/"))} and any(k.startswith("test/") for k in keys)
    for k in keys:  # SecAgg+ rounds stochastically to 2 / 2^22 of the clipping range (1.0): ~5e-7 per value
      assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (w["round"], k)
  assert any(g[k] != w[k] for w, g in zip(want, got) for k in w if k.startswith("test/"))  # (not the plain path)

  # plain rounds carry each node's heads; secure rounds carry none, only masked vectors
  assert all(sum(len(a) for a in r.content.array_records.values()) > 0 for r in _train_replies(plain))
  secure_replies = _train_replies(masked)
  vectors = [r.content.config_records["secaggplus_configs"]["masked_params"] for r in secure_replies
             if "masked_params" in r.content.config_records.get("secaggplus_configs", {})]
  assert len(vectors) == 2 * 3  # 2 rounds x 3 participants (join 0.75 of 4)
  assert all(sum(len(a) for a in r.content.array_records.values()) == 0 for r in secure_replies)
  from flwr.common import bytes_to_ndarray
  for v in vectors:  # uniform over [0, 2^32), not quantised updates (< 2^22 + the weight factor)
    values = np.concatenate([bytes_to_ndarray(b).ravel() for b in v]).astype(np.float64)
    assert values.std() > 2.0 ** 29 and values.max() > 2.0 ** 31


def test_secure_aggregation_refuses_a_single_participant_and_names_a_too_small_clipping_range(tmp_path, prep,
                                                                                               capsys):
  with pytest.raises(SystemExit) as e:
    _run(tmp_path, prep, "one", "join_ratio=0.25", secure={"secure-aggregation": "true"})
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "secure aggregation needs at least 2 participants a round" in err and "samples 1" in err
  assert not (tmp_path / "one").exists()

  with pytest.raises(SystemExit) as e:
    _run(tmp_path, prep, "clip", secure={"secure-aggregation": "true", "secagg-clipping-range": "1e-9"})
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "outside SecAgg+'s clipping range 1e-09: raise the run config's secagg-clipping-range" in err
  assert "did not answer round 1" in err.splitlines()[-1]
  assert not (tmp_path / "clip" / "metrics.jsonl").exists() or _rows(tmp_path / "clip") == []
