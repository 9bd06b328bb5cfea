"""Two processes on 127.0.0.1 (gloo CPU collectives), each holding half the clients, compute the same
FedAvg rounds as one process; a missing peer is a prompt, clear error instead of a hang or an abort.

The two-process job runs as subprocesses of this file (``python tests/test_distributed.py child ...``),
each with 2 CPU devices, so the 'clients' mesh spans 4 devices on 2 processes.
"""

import os
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


def test_two_processes_equal_one_process(tmp_path):
  import jax

  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(ROOT),
             JAX_PLATFORMS="cpu")
  out = tmp_path / "server.npz"
  procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "child", f"127.0.0.1:{port}", str(i),
                             str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("the two-process job did not finish in 300 s")
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


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
  child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
