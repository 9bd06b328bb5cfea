"""Deployment without the simulation (a2v_jax/deploy): nodes and a server exchanging heads give the vmapped
engine's numbers; nodes that disagree, modes a deployment does not run, and nodes lost mid-run."""

import json

import pytest

from a2v_jax import config
from a2v_jax.deploy.node import DeploymentError, NodeProgram
from a2v_jax.deploy.run import LocalTransport, run_deployment
from a2v_jax.deploy.server import ServerProgram
from a2v_jax.run.trainer import train_and_evaluate
from tests.fakes import synthetic_prepared

# Sampling (2 of 3 nodes), sample-weighted FedAvg with server momentum, two local epochs, fedprox: every
# piece of state the server and the nodes must carry between rounds.
BASE = ["local_epochs=2", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2",
        "num_nodes=3", "global_rounds=3", "join_ratio=0.67", 'adapter_aggregation_mode="weighted"',
        "server_momentum=0.5", 'local_drift_correction="fedprox"', "fedprox_mu=0.1", "seed=2"]  # seed 2: three samples


def _cfg(tmp_path, name, *extra):
  return config.load(None, BASE + [f'output_dir="{tmp_path}"', f'name="{name}"', *extra])


def _rows(run_dir):
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _nodes(cfg, prep):
  return [NodeProgram.build(cfg, i, prep) for i in range(cfg.data.num_nodes)]


@pytest.fixture(scope="module")
def prep():
  return synthetic_prepared()


def test_deployed_rounds_equal_the_vmapped_engine(tmp_path, prep):
  train_and_evaluate(_cfg(tmp_path, "sim"), verbose=False, prepared=prep)
  cfg = _cfg(tmp_path, "dep")
  summary = run_deployment(cfg, LocalTransport(_nodes(cfg, prep)), verbose=False)
  want, got = _rows(tmp_path / "sim"), _rows(tmp_path / "dep")
  assert len(got) == len(want) == 3
  trained = []
  for w, g in zip(want, got):
    keys = {k for k in w if k.startswith(("train/", "test/"))}
    assert keys == {k for k in g if k.startswith(("train/", "test/"))}
    assert any(k.startswith("test/server/") for k in keys) and any(k.startswith("test/node_2/") for k in keys)
    for k in keys:  # single-client programs against vmapped ones: float rounding only
      assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (w["round"], k)
    trained.append(tuple(g[f"train/node_{i}/clip_loss"] != 0.0 for i in range(3)))
  assert all(sum(t) == 2 for t in trained) and len(set(trained)) > 1, trained  # the engine's sample, resampled
  assert summary["deployment"] and summary["rounds"] == 3
  assert {p.name for p in (tmp_path / "dep").iterdir()} >= {"config.json", "metrics.jsonl", "summary.json"}


def test_a_node_with_another_config_is_refused_naming_the_difference(tmp_path, prep):
  cfg = _cfg(tmp_path, "s")
  nodes = [n.describe() for n in _nodes(cfg, prep)]
  other = NodeProgram.build(_cfg(tmp_path, "s", "clip_adapter_hidden=[16]"), 1, prep).describe()
  with pytest.raises(DeploymentError, match=r"node 1: heads.clip_adapter_hidden: node \(16,\) != server \(8,\)"):
    ServerProgram(cfg, [nodes[0], other, nodes[2]])
  with pytest.raises(DeploymentError, match=r"expects nodes 0\.\.2.*\[0, 2\]"):
    ServerProgram(cfg, [nodes[0], nodes[2]])
  assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("extra, key", [(['adapter_aggregation_mode="kd"', "use_generator=true",
                                          "generator_training_mode=true"], "adapter_aggregation_mode"),
                                        (['local_drift_correction="scaffold"'], "local_drift_correction"),
                                        (['client_state="stateless"'], "client_state")])
def test_what_a_deployment_does_not_run_is_refused(tmp_path, prep, extra, key):
  cfg = _cfg(tmp_path, "s", *extra)
  with pytest.raises(DeploymentError, match=key):
    ServerProgram(cfg, [n.describe() for n in _nodes(_cfg(tmp_path, "s"), prep)])


class _Losing(LocalTransport):
  """Node 1 stops answering from round 2 on."""

  def __init__(self, nodes):
    super().__init__(nodes)
    self.calls = 0

  def train(self, nodes, params, config):
    self.calls += 1
    return super().train([i for i in nodes if i != 1 or self.calls < 2], params, config)

  def evaluate(self, params):
    out = super().evaluate(params)
    return {i: v for i, v in out.items() if i != 1 or self.calls < 2}


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_a_lost_node_stops_the_run_or_the_rest_go_on(tmp_path, prep, policy):
  cfg = _cfg(tmp_path, policy, "join_ratio=1.0", f'deployment_on_node_failure="{policy}"')
  transport = _Losing(_nodes(cfg, prep))
  if policy == "stop":
    with pytest.raises(DeploymentError, match=r"node\(s\) \[1\] did not answer round 2; stopping"):
      run_deployment(cfg, transport, verbose=False)
    rows = _rows(tmp_path / policy)
    assert [r["round"] for r in rows] == [1]  # round 1 kept
    return
  summary = run_deployment(cfg, transport, verbose=False)
  rows = _rows(tmp_path / policy)
  assert [r["round"] for r in rows] == [1, 2, 3]
  assert "server/nodes_missing" not in rows[0] and rows[1]["server/nodes_missing"] == 1
  assert rows[2]["train/node_1/clip_loss"] == 0.0 and rows[2]["train/node_0/clip_loss"] > 0.0
  assert "test/node_1/clip_accuracy_on_test" not in rows[2] and "test/node_0/clip_accuracy_on_test" in rows[2]
  assert summary["nodes_missing"] == [{"round": 2, "node": 1}, {"round": 3, "node": 1}]


def test_loopback_script_waits_for_the_superlink_port(tmp_path):
  """benchmarks/flower_loopback.py starts the SuperNodes once the SuperLink's port answers (no fixed sleep): a
  listener that opens late is waited for; a process that dies first is reported, naming the port."""
  import socket
  import subprocess
  import sys
  import threading
  from benchmarks.flower_loopback import _free_port, wait_for_port
  port = _free_port()
  server = socket.socket()

  def listen_late():
    import time
    time.sleep(0.5)
    server.bind(("127.0.0.1", port))
    server.listen()

  threading.Thread(target=listen_late, daemon=True).start()
  alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
  try:
    assert 0.4 < wait_for_port("127.0.0.1", port, 10.0, alive) < 10.0
  finally:
    alive.kill()
    server.close()
  dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
  dead.wait()
  with pytest.raises(RuntimeError, match=f"127.0.0.1:{port} exited with status 3"):
    wait_for_port("127.0.0.1", port, 10.0, dead)
