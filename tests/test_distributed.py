"""Two processes on 127.0.0.1 (gloo CPU collectives), each holding half the clients, compute the same
FedAvg rounds as one process; a missing peer is a prompt, clear error instead of a hang or an abort.

The two-process job runs as subprocesses of this file (``python tests/test_distributed.py child ...``),
each with 2 CPU devices, so the 'clients' mesh spans 4 devices on 2 processes. The CLI tests start
``python -m experiments.run --coordinator ...`` twice (one CPU device each) on a tiny FSDD config.
``--coordinator auto`` is checked under a SLURM job simulated on 127.0.0.1 (``slurm_child``): the
variables JAX's SLURM detection reads, no real SLURM, Open MPI or TPU.
"""

import dataclasses
import errno
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from a2v_jax.federated import distributed  # noqa: E402
from a2v_jax.run import children  # noqa: E402
from tests.test_sharding import _problem  # noqa: E402

NUM_CLIENTS, ROUNDS = 8, 2


def _free_port() -> int:
  """Two consecutive free ports (the coordinator's and the rendezvous's)."""
  for _ in range(50):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    try:
      with socket.socket() as s2:
        s2.bind(("127.0.0.1", port + 1))
      return port
    except OSError:
      continue
  raise RuntimeError("no free port pair")


def _inputs():
  import jax

  from a2v_jax.federated.local import Shared
  from experiments import scaling
  cfg, w, alg, init = _problem(NUM_CLIENTS)
  data = scaling.synthetic_data(w)
  shared = Shared(np.asarray(data.features), np.asarray(data.labels),
                  {b: np.asarray(t) for b, t in data.targets.items()})
  rdata = scaling.round_data(w, data)
  rdata = rdata._replace(count=rdata.count.at[-1].set(0))  # one client without data, as padding would be
  server, clients = jax.device_get(init(jax.random.PRNGKey(0)))
  return alg, server, clients, jax.device_get(rdata), shared


def child(coordinator: str, process_id: int, out: str) -> None:
  """One of the two processes: its half of the clients, global arrays, ROUNDS rounds."""
  import jax

  from a2v_jax.federated import engine, sharding
  distributed.initialize(coordinator, 2, process_id, timeout_s=60, heartbeat_timeout_s=20)
  assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
  alg, server, clients, rdata, shared = _inputs()
  mesh = sharding.client_mesh()
  mine = distributed.process_clients(NUM_CLIENTS, mesh)
  assert mine.stop - mine.start == NUM_CLIENTS // 2, mine
  local = lambda t: jax.tree.map(lambda x: np.asarray(x)[mine], t)
  clients = distributed.global_clients(local(clients), mesh, NUM_CLIENTS)
  rdata = engine.RoundData(*distributed.global_clients(local(tuple(rdata)), mesh, NUM_CLIENTS))
  server = distributed.global_replicated(server, mesh)
  shared = distributed.global_replicated(shared, mesh)
  round_fn = jax.jit(alg.round)
  for _ in range(ROUNDS):
    server, clients, metrics = round_fn(server, clients, rdata, shared)
  params = distributed.fetch(server.params)
  client_params = distributed.fetch(clients.params)  # gathered from both processes
  if process_id == 0:
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    flat.update({"clients" + jax.tree_util.keystr(k): v
                 for k, v in jax.tree_util.tree_leaves_with_path(client_params)})
    np.savez(out, **flat)
  jax.distributed.shutdown()
  print(f"CHILD-{process_id}-OK")


def _outputs(procs: list, what: str, timeout_s: float = 300) -> list[str]:
  """Each process's output; kills them all and fails if any runs past ``timeout_s`` (never a hung test)."""
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{what} did not finish in {timeout_s:.0f} s")
  return logs


def test_two_processes_equal_one_process(tmp_path):
  import jax

  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(ROOT),
             JAX_PLATFORMS="cpu")
  out = tmp_path / "server.npz"
  procs = [children.popen([sys.executable, str(Path(__file__).resolve()), "child", f"127.0.0.1:{port}", str(i),
                             str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = _outputs(procs, "the two-process job")
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0 and f"CHILD-{i}-OK" in log, log[-4000:]

  # The same rounds in this (single-device) process.
  alg, server, clients, rdata, shared = _inputs()
  round_fn = jax.jit(alg.round)
  for _ in range(ROUNDS):
    server, clients, _ = round_fn(server, clients, rdata, shared)
  got = np.load(out)
  want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(server.params))}
  want.update({"clients" + jax.tree_util.keystr(k): v
               for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(clients.params))})
  assert set(got.files) == set(want)
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("process_id", [0, 1])
def test_missing_peer_is_a_prompt_error(process_id):
  """Process 0 alone (peer never comes) and process 1 alone (no coordinator): bounded, named error."""
  port = _free_port()
  start = time.monotonic()
  with pytest.raises(distributed.DistributedInitError, match="never arrived" if process_id == 0 else "process 0"):
    distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=1.5)
  assert time.monotonic() - start < 5.0


def test_rendezvous_rejects_a_wrong_process_count():
  """A peer started with another --num-processes is refused, and process 0 reports who is missing."""
  import threading
  port = _free_port()
  errors = {}

  def lead():
    try:
      distributed.rendezvous(f"127.0.0.1:{port}", 2, 0, timeout_s=2.0)
    except distributed.DistributedInitError as e:
      errors[0] = str(e)

  t = threading.Thread(target=lead)
  t.start()
  with pytest.raises(distributed.DistributedInitError):
    distributed.rendezvous(f"127.0.0.1:{port}", 3, 1, timeout_s=2.0)
  t.join()
  assert "[1] never arrived" in errors[0]


# --- --coordinator auto under SLURM, simulated on 127.0.0.1 ----------------------------------------

# What jax 0.10.2's cluster detection reads (jax/_src/clusters/slurm_cluster.py): a SLURM job needs all five;
# the coordinator is the step's first node at port ``SLURM_JOB_ID % 4096 + 61440``.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _slurm_port(job_id: int) -> int:
  return job_id % 2**12 + (65535 - 2**12 + 1)


def _port_is_free(port: int) -> bool:
  """Nothing listens on ``port`` (JAX's coordinator binds every address, ``[::]:port``)."""
  for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    try:
      with socket.socket(family) as s:
        s.bind((host, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        return False  # (other errors: no IPv6 on this host)
  return True


def _slurm_job_id() -> int:
  """A job id whose derived coordinator port is free here (random: concurrent test runs rarely meet)."""
  for _ in range(200):
    job_id = random.randrange(100_000, 10_000_000)
    if _port_is_free(_slurm_port(job_id)):
      return job_id
  raise RuntimeError("no free port in SLURM's coordinator range [61440, 65535]")


def _without_launchers(env: dict) -> dict:
  """``env`` minus every launcher's and JAX's own settings, so only the simulated SLURM job is detected
  (Open MPI is checked before SLURM; a CI that itself runs under SLURM must not leak into the test)."""
  return {k: v for k, v in env.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))
          and k not in ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS")}


def _slurm_env(job_id: int, procid: int, ntasks: int = 2) -> dict:
  """The variables ``srun --ntasks=2`` would give task ``procid`` of job ``job_id`` on one node."""
  return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(ntasks),
          "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid)}


def slurm_child() -> None:
  """One task of the simulated SLURM job: joins as ``experiments.run --coordinator auto`` does (``_join``),
  then sums a value from each process over the 'clients' mesh and gathers both values back."""
  import argparse

  import jax
  import jax.numpy as jnp
  from jax._src import distributed as jax_distributed

  from a2v_jax.federated import sharding
  from experiments import run
  run._join(argparse.Namespace(coordinator="auto", num_processes=None, process_id=None, init_timeout=30.0))
  mesh = sharding.client_mesh()  # one CPU device per process: 2 clients, one per process
  mine = distributed.process_clients(2, mesh)
  value = 10.0 ** jax.process_index()  # 1 and 10: a sum of 11 has each process's value exactly once
  x = distributed.global_clients(np.full((mine.stop - mine.start,), value, np.float32), mesh, 2)
  total = distributed.fetch(jax.jit(jnp.sum)(x))
  gathered = distributed.fetch(x)
  distributed.barrier("slurm-child", 30)
  print("SLURM-CHILD " + json.dumps({
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "coordinator": jax_distributed.global_state.coordinator_address, "devices": len(jax.devices()),
      "clients": [mine.start, mine.stop], "sum": float(total), "gathered": np.asarray(gathered).tolist()}),
      flush=True)
  jax.distributed.shutdown()


def test_auto_under_slurm_joins_two_processes():
  """``--coordinator auto`` with two SLURM tasks on localhost: JAX's SLURM detection gives the coordinator
  (first node, port from the job id), 2 processes and each task's SLURM_PROCID as its index; a sum over
  the 'clients' mesh crosses both processes."""
  job_id = _slurm_job_id()
  base = _without_launchers(dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  procs = [children.popen([sys.executable, str(Path(__file__).resolve()), "slurm-child"], cwd=ROOT,
                            env={**base, **_slurm_env(job_id, i)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = _outputs(procs, "the simulated SLURM job", timeout_s=120)
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"task {i}:\n{log[-4000:]}"
    lines = [l for l in log.splitlines() if l.startswith("SLURM-CHILD ")]
    assert len(lines) == 1, log[-4000:]
    got = json.loads(lines[0].split(" ", 1)[1])
    assert got == {"process_index": i, "process_count": 2, "coordinator": f"localhost:{_slurm_port(job_id)}",
                   "devices": 2, "clients": [i, i + 1], "sum": 11.0, "gathered": [1.0, 10.0]}, got


def test_auto_missing_peer_exits_2_with_one_line(tmp_path):
  """Task 0 of a 2-task SLURM job whose other task never starts: ``--coordinator auto`` exits with status 2
  and one line naming the missing process, within seconds (JAX alone would abort with a stack trace)."""
  env = {**_without_launchers(_cli_env(tmp_path)), **_slurm_env(_slurm_job_id(), 0)}
  start = time.monotonic()
  r = subprocess.run([sys.executable, "-m", "experiments.run", "--quiet", "--set", f'output_dir="{tmp_path / "runs"}"',
                      "--coordinator", "auto", "--init-timeout", "1"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 2, r.stderr
  assert r.stderr.startswith("error (DistributedInitError): process 0 waited 1 s") and "[1] never arrived" in r.stderr
  assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
  assert time.monotonic() - start < 30
  assert not (tmp_path / "runs").exists()


def test_auto_without_process_0_is_a_prompt_error(monkeypatch):
  """Task 1 alone (process 0 never listens on the derived port): a bounded error naming process 0."""
  for k in list(os.environ):
    if k not in _without_launchers(dict(os.environ)):
      monkeypatch.delenv(k)
  for k, v in _slurm_env(_slurm_job_id(), 1).items():
    monkeypatch.setenv(k, v)
  start = time.monotonic()
  with pytest.raises(distributed.DistributedInitError, match="with process 0 at localhost:6"):
    distributed.initialize(None, timeout_s=1.5)
  assert time.monotonic() - start < 5.0


def test_auto_outside_a_cluster_is_refused(monkeypatch):
  """No launcher's variables: ``--coordinator auto`` refuses with a hint instead of guessing an address."""
  import argparse

  from experiments import run
  for k in list(os.environ):
    if k not in _without_launchers(dict(os.environ)) or k == "KUBERNETES_SERVICE_HOST":
      monkeypatch.delenv(k)
  with pytest.raises(distributed.DistributedInitError, match="found no SLURM / Open MPI / TPU pod settings"):
    run._join(argparse.Namespace(coordinator="auto", num_processes=None, process_id=None, init_timeout=1.0))


# --- the CLI across processes -----------------------------------------------------------------------

# Two FSDD digits on 4 speaker-nodes (2 per process, no padded clients), narrow heads, an evaluation and
# a checkpoint every round.
CLI_SETTINGS = ['selected_classes=["zero","one"]', "num_nodes=4", "clip_adapter_hidden=[16]",
                "t5_adapter_hidden=[16]", "eval_gap=1", "checkpoint_frequency=1"]
RUN_FILES = {"config.json", "metrics.jsonl", "metrics.csv", "summary.json", "plot.png", "state"}


def _cli_env(tmp_path) -> dict:
  # One CPU device per process. Compiling dominates these runs: XLA skips LLVM's expensive passes (a third
  # less CPU; one process and two compare under the same flags), and programs are shared through a
  # persistent cache, so the resumed job reuses the first job's.
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _cli_args(tmp_path, name: str, rounds: int) -> list[str]:
  """The embedded default config, made tiny; backbones by path (written once by the test), so no run
  imports torch to check the tiny ones."""
  bb = tmp_path / "backbones"
  sets = CLI_SETTINGS + [f"global_rounds={rounds}", f'output_dir="{tmp_path / "runs"}"', f'name="{name}"',
                         f'cache_dir="{tmp_path / "cache"}"', f'ast_model="{bb / "ast"}"',
                         f'clip_text_model="{bb / "clip_text"}"', f't5_model="{bb / "t5"}"']
  return [sys.executable, "-m", "experiments.run", "--config", str(ROOT / "experiments/configs/fsdd_tiny.json")] + [
      a for kv in sets for a in ("--set", kv)]


def _two_process_cli(tmp_path, args: list[str]) -> list[str]:
  """Runs ``args`` as processes 0 and 1 of one job; returns their outputs (both must exit 0)."""
  port = _free_port()
  procs = [children.popen(args + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                    "--process-id", str(i), "--init-timeout", "60"],
                            cwd=ROOT, env=_cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  logs = _outputs(procs, "the two-process CLI job")
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
  return logs


def _rows(run_dir: Path) -> list[dict]:
  import json
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_rows_close(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in w:
      if not k.endswith("_seconds"):  # (timings) sums over clients meet in another order: float tolerance
        assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (g["round"], k)


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "data" / "fsdd" / "recordings").is_dir(), reason="FSDD not present")
def test_cli_two_processes_equal_one_and_resume(tmp_path):
  """``experiments.run`` as a 2-process job: process 0 alone writes one run directory, whose metrics
  equal a single-process run's; ``--resume`` continues the job from its checkpoint."""
  import json

  from a2v_jax import config
  from a2v_jax.backbones.paths import backbone_dir
  tiny = config.load(None, [f'tiny_dir="{tmp_path / "backbones"}"'])
  for kind in ("ast", "clip_text", "t5"):
    backbone_dir(tiny, kind)

  # Round 1 across two processes (process 0 fills the feature caches while process 1 waits for it).
  first = _two_process_cli(tmp_path, _cli_args(tmp_path, "job", 1))
  assert "resolved config" in first[0] and "resolved config" not in first[1]
  assert "run directory" not in first[1]
  # Two rounds in one process, from the same caches.
  single = subprocess.run(_cli_args(tmp_path, "single", 2) + ["--quiet"], cwd=ROOT, env=_cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-4000:]
  want = _rows(tmp_path / "runs" / "single")
  job = tmp_path / "runs" / "job"
  _assert_rows_close(_rows(job), want[:1])
  # Round 2: the job resumed from its round-1 checkpoint, restored by both processes.
  resumed = _two_process_cli(tmp_path, _cli_args(tmp_path, "job", 2) + ["--resume"])
  assert "resumed from round 1" in resumed[0] and "resumed from round 1" not in resumed[1]
  _assert_rows_close(_rows(job), want)
  assert {p.name for p in job.iterdir()} == RUN_FILES
  assert {p.name for p in (tmp_path / "runs").iterdir()} == {"job", "single"}
  summary = json.loads((job / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["rounds"] == 2
  assert summary["final"] == pytest.approx(json.loads((tmp_path / "runs" / "single" / "summary.json").read_text())
                                           ["final"], rel=1e-4, abs=1e-5)


# Tiny generators (the sizes tests/test_generator_runs.py uses): one per node and digit, 8 slots.
# (cogx: one head branch, t5, halves the heads' compile time.)
GEN_SETTINGS = ['diffusion_type="cogx"', "generator_hidden_dim=16", "generator_latent_dim=4",
                "generator_training_sequence_length=2"]
GEN_TRAINING = ["generator_batch_size=8", "generator_training_epochs=2"]  # Run 1 only (refused where ignored)


def _generator_args(tmp_path, name: str, rounds: int, gens: str, *extra: str) -> list[str]:
  sets = GEN_SETTINGS + [f'generator_checkpoint_dir="{tmp_path / "gens"}"', f'generator_checkpoint_base_name="{gens}"',
                         *extra]
  return _cli_args(tmp_path, name, rounds) + [a for kv in sets for a in ("--set", kv)]


def _start_single_cli(tmp_path, args: list[str]) -> subprocess.Popen:
  return children.popen(args + ["--quiet"], cwd=ROOT, env=_cli_env(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "data" / "fsdd" / "recordings").is_dir(), reason="FSDD not present")
def test_cli_two_processes_generator_runs_equal_one(tmp_path):
  """Run 1 (heads + generators) and then Run 2 (restored generators, synthetic rows redrawn in round 2,
  KD aggregation) as 2-process jobs equal the same runs in one process: the generator stage runs
  replicated, process 0 alone writes the run directory and the generator checkpoints, both read them."""
  import jax

  from a2v_jax import config
  from a2v_jax.generators import checkpoint as gc
  from a2v_jax.backbones.paths import backbone_dir
  tiny = config.load(None, [f'tiny_dir="{tmp_path / "backbones"}"'])
  for kind in ("ast", "clip_text", "t5"):
    backbone_dir(tiny, kind)
  runs = tmp_path / "runs"

  # Run 1, one round: process 0 fills the caches, both train the heads (2 nodes each) and the 8 generators.
  run1 = ["use_generator=true", "generator_training_mode=true", *GEN_TRAINING]
  _two_process_cli(tmp_path, _generator_args(tmp_path, "run1_job", 1, "job", *run1))
  # Run 2 from the job's generators, two rounds (fresh synthetic rows in round 2) with KD on both. The
  # one-process runs only read the caches and the job's generators: they run beside the Run 2 job.
  run2 = ["use_pretrained_generators=true", 'adapter_aggregation_mode="kd"', "kd_training_epochs=2",
          "kd_samples_per_class=8"]
  singles = [_start_single_cli(tmp_path, _generator_args(tmp_path, "run1_single", 1, "single", *run1)),
             _start_single_cli(tmp_path, _generator_args(tmp_path, "run2_single", 2, "job", *run2))]
  _two_process_cli(tmp_path, _generator_args(tmp_path, "run2_job", 2, "job", *run2))
  for p, log in zip(singles, _outputs(singles, "the one-process runs")):
    assert p.returncode == 0, log[-4000:]

  rows = _rows(runs / "run1_job")
  assert "train/node_3/generator_recon" in rows[0] and "train/node_3/t5_loss" in rows[0]
  _assert_rows_close(rows, _rows(runs / "run1_single"))
  assert {p.name for p in (runs / "run1_job").iterdir()} == RUN_FILES
  job_gens = config.load(None, GEN_SETTINGS + [f'generator_checkpoint_dir="{tmp_path / "gens"}"',
                                               'generator_checkpoint_base_name="job"']).generators
  assert gc.scan_rounds(job_gens) == ([1], [])  # written once: no stray temporary entries of a second writer
  assert {p.name for p in gc.checkpoint_root(job_gens).iterdir()} == {"round_00001", "latest"}
  got, _ = gc.restore_generators(job_gens)
  want, _ = gc.restore_generators(dataclasses.replace(job_gens, generator_checkpoint_base_name="single"))
  for a, b in zip(jax.tree.leaves(got.arrays()), jax.tree.leaves(want.arrays())):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  rows = _rows(runs / "run2_job")
  assert rows[-1]["server/kd_samples"] == 2 * 8 and "server/kd_t5_loss_end" in rows[-1]
  assert rows[-1]["server/synthetic_samples_total"] > 0
  _assert_rows_close(rows, _rows(runs / "run2_single"))
  assert {p.name for p in (runs / "run2_job").iterdir()} == RUN_FILES
  assert {p.name for p in runs.iterdir()} == {"run1_job", "run1_single", "run2_job", "run2_single"}
  summary = json.loads((runs / "run2_job" / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["generator_round"] == 1


def test_generator_only_mode_on_a_second_process_writes_nothing(tmp_path, monkeypatch):
  """``generator_only_mode`` across processes is the replicated stage of Run 1 above (``train_round``,
  ``save_generators``) without heads; checked cheaply in this process posing as process 1 of 2: it trains
  every round, meets process 0 at both barriers of each save and writes nothing (process 0 writes)."""
  import jax

  from a2v_jax import config

  from a2v_jax.run import trainer
  from tests.fakes import synthetic_prepared
  barriers = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(distributed, "barrier", lambda name, timeout_s: barriers.append(name))
  cfg = config.load(None, GEN_SETTINGS + GEN_TRAINING + ["use_generator=true", "generator_only_mode=true", "global_rounds=2",
                                          "num_nodes=3", f'output_dir="{tmp_path}/runs"',
                                          f'generator_checkpoint_dir="{tmp_path}/gens"'])
  summary = trainer.train_and_evaluate(cfg, verbose=False, prepared=synthetic_prepared())
  assert summary["rounds"] == 2 and summary["generator_slots"] > 0
  assert [b.rsplit("_", 1)[1] for b in barriers] == ["begin", "end"] * 2 and len(set(barriers)) == 4
  assert list(tmp_path.iterdir()) == []


def test_cli_missing_peer_exits_2_with_one_line(tmp_path):
  """Process 0 of a 2-process job whose peer never starts: exit status 2 and one line, within seconds."""
  port = _free_port()
  start = time.monotonic()
  r = subprocess.run([sys.executable, "-m", "experiments.run", "--quiet", "--set", f'output_dir="{tmp_path / "runs"}"',
                      "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0",
                      "--init-timeout", "1"], cwd=ROOT, env=_cli_env(tmp_path), capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 2, r.stderr
  assert r.stderr.startswith("error (DistributedInitError): process 0 waited 1 s") and "[1] never arrived" in r.stderr
  assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
  assert time.monotonic() - start < 30
  assert not (tmp_path / "runs").exists()  # nothing written before the job exists


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
  child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
if __name__ == "__main__" and sys.argv[1:2] == ["slurm-child"]:
  slurm_child()
