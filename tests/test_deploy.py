"""Deployment without the simulation (a2v_jax/deploy): nodes and a server exchanging heads give the vmapped
engine's numbers; nodes that disagree, modes a deployment does not run, and nodes lost mid-run."""

import json
from pathlib import Path

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


FSDD = Path(__file__).resolve().parents[1] / "data" / "fsdd"


@pytest.mark.skipif(not (FSDD / "recordings").is_dir(), reason="FSDD not present")
def test_nodes_holding_only_their_own_folders_give_the_engine_s_numbers(tmp_path, monkeypatch):
  """Three institutions, each given a folder holding only its speakers' clips (its own dataset_root, its own feature
  cache): the deployment's rows equal the simulation's on the whole dataset, partitioned; the server reads no
  audio and runs no encoder."""
  sets = ['selected_classes=["zero","one"]', "num_nodes=3", "global_rounds=2", "clip_adapter_hidden=[8]",
          "t5_adapter_hidden=[8]", "map_heads=2", "eval_gap=1", "checkpoint_frequency=5", "max_length=64",
          'diffusion_type="cogx"', f'output_dir="{tmp_path}"', f'tiny_dir="{tmp_path / "backbones"}"']
  cfg_file = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "fsdd_tiny.json"
  sim = config.load(str(cfg_file), sets + ['name="sim"', f'dataset_root="{FSDD}"', f'cache_dir="{tmp_path}/c"'])
  train_and_evaluate(sim, verbose=False)
  speakers = sorted({p.name.split("_")[1] for p in (FSDD / "recordings").iterdir()})
  nodes = []
  for k in range(3):  # partition 'group': sorted speaker i -> node i % 3
    own = tmp_path / f"institution_{k}" / "recordings"
    own.mkdir(parents=True)
    for p in (FSDD / "recordings").iterdir():
      if speakers.index(p.name.split("_")[1]) % 3 == k:
        (own / p.name).symlink_to(p)
    node_cfg = config.load(str(cfg_file), sets + ['name="dep"', 'dataset_root="/nowhere"',
                                                   f'cache_dir="{tmp_path}/cache_{k}"'])
    nodes.append(NodeProgram.build(node_cfg, k, dataset_root=own.parent))
  assert [len(n.train_rows) for n in nodes] == [len(s["train"]) for s in _sim_nodes(sim)]

  def no_audio(*a, **k):
    raise AssertionError("the server must not read audio or run an encoder")
  monkeypatch.setattr("a2v_jax.data.registry.read_dataset", no_audio)
  monkeypatch.setattr("a2v_jax.features.ast_features", no_audio)
  dep = config.load(str(cfg_file), sets + ['name="dep"', 'dataset_root="/server/has/no/audio"'])
  run_deployment(dep, LocalTransport(nodes), verbose=False)
  want, got = _rows(tmp_path / "sim"), _rows(tmp_path / "dep")
  assert len(got) == len(want) == 2
  for w, g in zip(want, got):
    keys = {k for k in w if k.startswith(("train/", "test/"))}
    assert keys == {k for k in g if k.startswith(("train/", "test/"))} and any("test/node_2/" in k for k in keys)
    for k in keys:
      assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (w["round"], k)


def _sim_nodes(cfg):
  from a2v_jax.data.nodes import build_nodes
  return build_nodes(cfg).nodes


def test_a_node_with_other_encoder_weights_or_seed_is_refused(tmp_path, prep):
  cfg = _cfg(tmp_path, "s")
  nodes = _nodes(cfg, prep)
  for n in nodes:
    n.backbones = {"ast": "aaaa", "t5": "bbbb"}
  nodes[2].backbones = {"ast": "cccc", "t5": "bbbb"}
  with pytest.raises(DeploymentError, match=r"node 2: other encoder weights than node 0 \(ast: content fingerprint"):
    ServerProgram(cfg, [n.describe() for n in nodes])
  nodes[2].backbones = nodes[0].backbones
  other_seed = NodeProgram.build(_cfg(tmp_path, "s", "seed=3"), 1, prep)
  other_seed.backbones = nodes[0].backbones
  with pytest.raises(DeploymentError, match=r"node 1: experiment.seed: node 3 != server 2"):
    ServerProgram(cfg, [nodes[0].describe(), other_seed.describe(), nodes[2].describe()])
  moved = NodeProgram.build(_cfg(tmp_path, "s", 'dataset_root="/mnt/hospital_b/fsdd"', 'cache_dir="/tmp/x"'), 1, prep)
  moved.backbones = nodes[0].backbones
  ServerProgram(cfg, [nodes[0].describe(), moved.describe(), nodes[2].describe()])  # paths may differ


def test_backbone_fingerprint_follows_content_not_path(tmp_path):
  from a2v_jax.backbones.fingerprint import fingerprint
  a, b = tmp_path / "a", tmp_path / "b"
  for d in (a, b):
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "w.bin").write_bytes(bytes(range(200)))
  cache = tmp_path / "fp.json"
  assert fingerprint(a, cache) == fingerprint(b, cache) == fingerprint(a)
  (b / "sub" / "w.bin").write_bytes(bytes(range(1, 201)))
  assert fingerprint(b, cache) != fingerprint(a, cache)


class _KilledMidRound(BaseException):
  """A kill -9 stand-in (not an Exception: nothing on the way up may swallow it)."""


class _DyingServer(LocalTransport):
  """The server process dies in round ``at`` after the sampled nodes trained (so they are a round ahead)."""

  def __init__(self, nodes, at):
    super().__init__(nodes)
    self.calls, self.at = 0, at

  def train(self, nodes, params, config):
    self.calls += 1
    out = super().train(nodes, params, config)
    if self.calls == self.at:
      raise _KilledMidRound()
    return out


def test_a_killed_server_resumes_and_gives_the_uninterrupted_rows(tmp_path, prep):
  """Checkpoints every 2 rounds; the server dies in round 4 after the nodes trained it (they are 2 rounds past the
  last checkpoint); resumed, it continues from round 2, the nodes train from their round-2 states, and every row
  equals the uninterrupted deployment's."""
  extra = ["global_rounds=4", "checkpoint_frequency=2"]
  run_deployment(_cfg(tmp_path, "straight", *extra), LocalTransport(_nodes(_cfg(tmp_path, "x", *extra), prep)),
                 verbose=False)
  cfg = _cfg(tmp_path, "killed", *extra)
  transport = _DyingServer(_nodes(cfg, prep), at=4)
  with pytest.raises(_KilledMidRound):
    run_deployment(cfg, transport, verbose=False)
  assert [r["round"] for r in _rows(tmp_path / "killed")] == [1, 2, 3]
  transport.at = -1
  summary = run_deployment(cfg, transport, verbose=False, resume=True)
  want, got = _rows(tmp_path / "straight"), _rows(tmp_path / "killed")
  assert [r["round"] for r in got] == [1, 2, 3, 4] and summary["rounds"] == 4
  for w, g in zip(want, got):
    for k in (k for k in w if k.startswith(("train/", "test/"))):
      assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), (w["round"], k)
