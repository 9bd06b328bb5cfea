"""The Flower ClientApp / ServerApp (a2v_jax/deploy/flower_app.py), message for message in one process: the
same server metrics as the vmapped engine, a lost node, a node that fails at start-up."""

import json
import os
from pathlib import Path

import pytest

# flwr is in the [test] extra (CI runs this file); an environment from the plain install has no flwr.
pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[test]' or '.[flower]')")

from a2v_jax.deploy import flower_app  # noqa: E402
from a2v_jax.reference.config import load_config  # noqa: E402
from a2v_jax.run.trainer import train_and_evaluate  # noqa: E402
from tests.fakes import synthetic_prepared  # noqa: E402

CONFIG = "experiments/configs/fsdd_tiny.json"  # the same config file drives the server, the nodes and the engine
SETTINGS = ["local_epochs=2", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2",
            "num_nodes=3", "global_rounds=3", "join_ratio=0.67", 'adapter_aggregation_mode="weighted"',
            "server_momentum=0.5", "seed=2"]  # seed 2: the sample changes between rounds


def _rows(run_dir):
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prep():
  return synthetic_prepared()


def _run_config(tmp_path, name, *extra):
  return {"config": CONFIG, "set": ";".join(SETTINGS + [f'output_dir="{tmp_path}"', f'name="{name}"', *extra])}


def test_flower_rounds_equal_the_vmapped_engine(tmp_path, prep):
  rc = _run_config(tmp_path, "flower")
  train_and_evaluate(load_config(CONFIG, rc["set"].split(";")[:-1] + ['name="sim"']), verbose=False, prepared=prep)
  flower_app.run_in_process(rc, 3, client=flower_app.make_client_app(lambda cfg: prep),
                            server=flower_app.make_server_app(verbose=False))
  want, got = _rows(tmp_path / "sim"), _rows(tmp_path / "flower")
  assert len(got) == len(want) == 3
  for w, g in zip(want, got):
    keys = {k for k in w if k.startswith(("train/", "test/"))}
    assert keys == {k for k in g if k.startswith(("train/", "test/"))}
    for k in keys:
      assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (w["round"], k)
  summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
  assert summary["deployment"] and summary["nodes"] == 3


def test_a_node_lost_in_round_2_leaves_the_rest_to_finish(tmp_path, prep):
  rc = _run_config(tmp_path, "lost", "join_ratio=1.0", 'deployment_on_node_failure="continue"')
  lost = {}

  def drop(msg):  # the SuperNode of partition 1 goes away after round 1
    node = msg.metadata.dst_node_id
    if msg.metadata.message_type == "train" and msg.metadata.group_id == "2":
      lost.setdefault("node", node)
    return node == lost.get("node")

  flower_app.run_in_process(rc, 3, client=flower_app.make_client_app(lambda cfg: prep),
                            server=flower_app.make_server_app(verbose=False), drop=drop)
  rows = _rows(tmp_path / "lost")
  assert [r["round"] for r in rows] == [1, 2, 3]
  gone = [i for i in range(3) if rows[2][f"train/node_{i}/clip_loss"] == 0.0]
  assert len(gone) == 1 and rows[1]["server/nodes_missing"] == 1
  assert all(rows[0][f"train/node_{i}/clip_loss"] > 0 for i in range(3))


def test_a_node_that_fails_at_start_up_ends_the_server_with_one_line(tmp_path, prep, capsys):
  rc = _run_config(tmp_path, "bad")

  def prepare(cfg):
    raise FileNotFoundError("/data/vegas/audio: no such directory")

  with pytest.raises(SystemExit) as e:
    flower_app.run_in_process(rc, 3, client=flower_app.make_client_app(prepare),
                              server=flower_app.make_server_app(verbose=False))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "failed the start-up query" in err[0] and "/data/vegas/audio" in err[0]
  assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("A2V_LOOPBACK"), reason="a real SuperLink + SuperNodes on loopback (minutes): "
                    "A2V_LOOPBACK=1 runs it; benchmarks/flower_loopback.py is the same as a script")
@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_loopback_deployment_with_a_supernode_killed_after_round_1(tmp_path, policy):
  """A SuperLink and two SuperNodes on 127.0.0.1, ``flwr run`` of the app for 3 rounds; SuperNode 1 is SIGKILLed
  once round 1 is logged (round 2's messages are on their way). 'continue': rounds 2-3 aggregate node 0 alone;
  'stop': the run ends after round 1, whose row is kept."""
  from benchmarks import flower_loopback
  out = tmp_path / "loopback"
  result = flower_loopback.run(2, 3, out, kill_node=1, reply_timeout_s=90,
                               extra=[f'deployment_on_node_failure="{policy}"'])
  rows = _rows(out / "runs" / "loopback")
  assert rows[0]["train/node_1/clip_loss"] > 0  # both nodes trained round 1
  if policy == "stop":
    # (the one line it ends with is tested in test_deploy.py; `flwr run --stream` may stop streaming before it)
    assert not result["finished"] and [r["round"] for r in rows] == [1], result
    return
  assert result["finished"] and result["nodes_missing"] == [0, 1, 1], result
  assert rows[2]["train/node_1/clip_loss"] == 0.0 and "test/server/clip_accuracy_on_test" in rows[2]


def test_a_node_unavailable_for_a_while_is_asked_again_and_its_round_is_unchanged(tmp_path, prep, monkeypatch,
                                                                                   capsys):
  """Flower answers NODE_UNAVAILABLE for a SuperNode that died; until rejoin-wait-s is over the server asks it again
  (a restarted node answers from its kept state), so the rows equal the uninterrupted run's. With rejoin-wait-s=0
  the node is lost at once, and the error names it by its partition id."""
  from flwr.app import Error
  from flwr.common.constant import ErrorCode
  monkeypatch.setattr(flower_app, "REJOIN_POLL_S", 0.01)
  extra = ["join_ratio=1.0", 'deployment_on_node_failure="continue"']
  client = lambda: flower_app.make_client_app(lambda cfg: prep)
  server = flower_app.make_server_app(verbose=False)
  flower_app.run_in_process(_run_config(tmp_path, "straight", *extra), 3, client=client(), server=server)
  refused = []

  def away(msg):  # partition 1's SuperNode (Flower id 2 * 7919) is away for its first 3 train messages of round 2
    if msg.metadata.dst_node_id == 2 * 7919 and msg.metadata.group_id == "2" and msg.metadata.message_type == "train":
      if len(refused) < 3:
        refused.append(msg.metadata.message_id)
        return Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable")
    return False

  flower_app.run_in_process({**_run_config(tmp_path, "rejoined", *extra), "rejoin-wait-s": 60}, 3, client=client(),
                            server=server, drop=away)
  assert len(set(refused)) == 3 and "node(s) ['1 (Flower node 15838)'] unavailable in the train of round 2" in \
      capsys.readouterr().err
  want, got = _rows(tmp_path / "straight"), _rows(tmp_path / "rejoined")
  for w, g in zip(want, got):
    for k in (k for k in w if k.startswith(("train/", "test/"))):
      assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), (w["round"], k)
  refused.clear()
  flower_app.run_in_process({**_run_config(tmp_path, "lost", *extra), "rejoin-wait-s": 0}, 3, client=client(),
                            server=server, drop=away)
  assert len(refused) == 1
  assert "server: node 1 (Flower node 15838) failed the round 2: Node Unavailable" in capsys.readouterr().err
  assert _rows(tmp_path / "lost")[1]["train/node_1/clip_loss"] == 0.0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("A2V_LOOPBACK"), reason="README's TLS commands on loopback (minutes, port 9093): "
                    "A2V_LOOPBACK=1 runs it; benchmarks/flower_secure.py --restarts is the same as a script")
def test_readme_s_tls_commands_run_as_written_and_the_run_survives_superlink_and_supernode_restarts(tmp_path):
  """README's commands as written (TLS from make_certs.sh, --database, node authentication, own folders); then again
  with the SuperLink SIGKILLed and restarted after round 1 and SuperNode 1 after round 3: the same rows."""
  from benchmarks import flower_secure
  plain = flower_secure.run_commands(tmp_path / "plain")
  restarted = flower_secure.run_commands(tmp_path / "restarted", kill_superlink_after=1, restart_node=(1, 3))
  assert plain["finished"] and restarted["finished"], (plain, restarted)
  events = [e["event"] for e in restarted["events"]]
  assert "superlink restarted" in events and "supernode 1 up again" in events
  rows = [[json.loads(l) for l in Path(r["metrics"]).read_text().splitlines()] for r in (plain, restarted)]
  assert len(rows[0]) == plain["rounds"]
  assert flower_secure.largest_difference(*rows) < 1e-5


class _ServerKilled(BaseException):
  """A kill -9 stand-in for the ServerApp process."""


def test_a_restarted_server_app_resumes_with_the_nodes_states_from_their_disks(tmp_path, prep):
  """Checkpoints every 2 rounds; the ServerApp dies as round 4 starts (the nodes have trained round 3). A new run
  (`resume=true`: fresh Flower contexts, so each node reads its states from its `state-dir`) resumes from round 2,
  the nodes train from their round-2 states, and every row equals the uninterrupted run's."""
  extra = ["global_rounds=4", "checkpoint_frequency=2"]
  client = lambda: flower_app.make_client_app(lambda cfg: prep)
  server = flower_app.make_server_app(verbose=False)
  flower_app.run_in_process(_run_config(tmp_path, "straight", *extra), 3, client=client(), server=server,
                            node_config={"state-dir": str(tmp_path / "straight_nodes")})

  def die_in_round_4(msg):
    if msg.metadata.message_type == "train" and msg.metadata.group_id == "4":
      raise _ServerKilled()
    return False

  rc = _run_config(tmp_path, "killed", *extra)
  nodes = {"state-dir": str(tmp_path / "nodes")}
  with pytest.raises(_ServerKilled):
    flower_app.run_in_process(rc, 3, client=client(), server=server, drop=die_in_round_4, node_config=nodes)
  assert [r["round"] for r in _rows(tmp_path / "killed")] == [1, 2, 3]
  flower_app.run_in_process({**rc, "resume": "true"}, 3, client=client(), server=server, node_config=nodes)
  want, got = _rows(tmp_path / "straight"), _rows(tmp_path / "killed")
  assert [r["round"] for r in got] == [1, 2, 3, 4]
  for w, g in zip(want, got):
    for k in (k for k in w if k.startswith(("train/", "test/"))):
      assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), (w["round"], k)
