"""Several processes (hosts) holding different clients of one round: joining, and global client arrays.

The round function does not change across hosts: the client axis is laid over a ``'clients'`` mesh
that spans every process's devices (``sharding.client_mesh()`` over ``jax.devices()``), each process
feeds only the clients its devices hold, and XLA's collectives (gloo on CPU, NCCL on GPU, ICI on TPU)
compute the FedAvg mean across processes. The CLI joins with ``--coordinator`` (experiments/run.py);
the trainer places its arrays through ``Placement`` and waits for process 0's caches at ``barrier``.

Why a rendezvous of our own before ``jax.distributed.initialize``: when a peer never comes, JAX's
coordination client does not raise, it aborts the whole process (``LOG(FATAL)`` ... ``DEADLINE_EXCEEDED``,
SIGABRT) after its timeout, taking the caller's clean-up and error message with it. ``initialize``
therefore first meets every peer over a plain TCP socket next to the coordinator's port, with a hard
deadline, and raises ``DistributedInitError`` naming the processes that did not arrive. Only then does it
call ``jax.distributed.initialize``, which then finds everyone present. A peer that dies later is caught
by JAX's heartbeat (``heartbeat_timeout_s``), which terminates the survivors instead of letting them hang.
Under a cluster launcher (``--coordinator auto``) the same meeting happens on the coordinator's port itself,
which JAX derives from the job (``detect_job``), before JAX's service takes that port over.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from a2v_jax.errors import A2VError
from a2v_jax.federated import sharding

_HELLO = b"A2V-RDV1"

# What to check when the rendezvous fails, by who chose the address: the user (--coordinator HOST:PORT) or
# a cluster launcher that JAX read (--coordinator auto). (process 0's advice, every other process's advice)
_ADVICE = {
    False: ("Start every process with the same --coordinator and --num-processes, or raise the timeout if some "
            "hosts start late.",
            "is process 0 running with the same --coordinator?"),
    True: ("Did the launcher start every task of the job (SLURM_NTASKS / Open MPI / TPU workers)? Raise the "
           "timeout if some hosts start late.",
           "is process 0 running, and is the coordinator's port reachable from this host?"),
}


class DistributedInitError(A2VError, RuntimeError):
  """The processes of a job could not all meet before the deadline."""


def _split(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"coordinator address must look like host:port, got {address!r}")
  return host.strip("[]"), int(port)


def _recv_line(conn: socket.socket, deadline: float) -> bytes:
  data = b""
  while not data.endswith(b"\n"):
    conn.settimeout(max(deadline - time.monotonic(), 0.01))
    chunk = conn.recv(256)
    if not chunk:
      raise ConnectionError("peer closed the connection")
    data += chunk
  return data.strip()


def rendezvous(coordinator: str, num_processes: int, process_id: int, timeout_s: float,
               port_offset: int = 1, *, detected: bool = False) -> None:
  """Waits until all ``num_processes`` processes have reached this call, or raises within ``timeout_s``.

  Process 0 listens on the coordinator's host at ``port + port_offset``; every other process connects
  to it and waits for the go. Mismatched process counts or duplicate ids are refused. ``port_offset=0``
  (the coordinator's own port) is safe: the port is free again once this returns, and the peers close
  their connections first, so no TIME_WAIT is left on process 0's side of it.
  ``detected``: the job's settings came from a cluster launcher (worded advice only).

  Raises:
    DistributedInitError: a peer did not arrive (or process 0 is not there) before the deadline.
  """
  if num_processes <= 1:
    return
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
  host, port = _split(coordinator)
  port += port_offset
  deadline = time.monotonic() + timeout_s
  lead_advice, follow_advice = _ADVICE[detected]
  if process_id == 0:
    _lead(host, port, num_processes, deadline, timeout_s, lead_advice)
  else:
    _follow(host, port, num_processes, process_id, deadline, timeout_s, follow_advice)


def _lead(host: str, port: int, n: int, deadline: float, timeout_s: float, advice: str) -> None:
  server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  peers: dict[int, socket.socket] = {}
  try:
    try:
      server.bind(("" if host not in ("127.0.0.1", "localhost") else host, port))
    except OSError as e:
      raise DistributedInitError(f"process 0 cannot listen on port {port} for the rendezvous: {e}") from e
    server.listen(n)
    while len(peers) < n - 1:
      left = deadline - time.monotonic()
      if left <= 0:
        missing = sorted(set(range(1, n)) - set(peers))
        for conn in peers.values():
          conn.sendall(b"FAIL " + ",".join(map(str, missing)).encode() + b"\n")
        raise DistributedInitError(
            f"process 0 waited {timeout_s:g} s for {n - 1} peer(s) at port {port}; process(es) {missing} never "
            f"arrived. {advice}")
      server.settimeout(left)
      try:
        conn, _ = server.accept()
      except socket.timeout:
        continue
      try:
        words = _recv_line(conn, deadline).split()
        if len(words) != 3 or words[0] != _HELLO:
          raise ValueError(f"unexpected greeting {words!r}")
        pid, count = int(words[1]), int(words[2])
      except (ValueError, ConnectionError, socket.timeout):
        conn.close()
        continue
      if count != n or pid in peers or not 0 < pid < n:
        conn.sendall(f"FAIL bad id {pid} or process count {count} (expected {n})\n".encode())
        conn.close()
        continue
      peers[pid] = conn
    for conn in peers.values():
      conn.sendall(b"GO\n")
    _await_close(peers.values(), time.monotonic() + 2.0)
  finally:
    for conn in peers.values():
      conn.close()
    server.close()


def _await_close(conns, deadline: float) -> None:
  """Waits (until ``deadline`` at most) for each peer to close its end after the go.

  Why: the side that closes a TCP connection first keeps it in TIME_WAIT; leaving that to the peers keeps
  process 0's listening port clean for JAX's coordinator when the rendezvous used that very port.
  """
  for conn in conns:
    try:
      conn.settimeout(max(deadline - time.monotonic(), 0.01))
      while conn.recv(256):
        pass
    except OSError:  # timed out or reset: close from this side then, nothing else is at stake
      pass


def _follow(host: str, port: int, n: int, pid: int, deadline: float, timeout_s: float, advice: str) -> None:
  last_error: Optional[Exception] = None
  while time.monotonic() < deadline:
    try:
      conn = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.01))
    except OSError as e:  # process 0 not listening yet
      last_error = e
      time.sleep(0.05)
      continue
    try:
      conn.sendall(_HELLO + f" {pid} {n}\n".encode())
      reply = _recv_line(conn, deadline)
    except (OSError, ConnectionError) as e:
      last_error = e
      conn.close()
      time.sleep(0.05)
      continue
    conn.close()
    if reply == b"GO":
      return
    raise DistributedInitError(f"process {pid}: the rendezvous at {host}:{port} failed: {reply.decode()!r} "
                               "(process ids listed after FAIL never arrived)")
  raise DistributedInitError(
      f"process {pid} could not complete the rendezvous with process 0 at {host}:{port} within {timeout_s:g} s "
      f"(last error: {last_error}); {advice}")


def initialize(coordinator: Optional[str], num_processes: Optional[int] = None, process_id: Optional[int] = None,
               timeout_s: float = 60.0, *, heartbeat_timeout_s: int = 30,
               local_device_ids: Optional[Sequence[int]] = None, preflight: bool = True) -> None:
  """Joins a multi-process job; raises ``DistributedInitError`` (never hangs) if a peer is missing.

  Args:
    coordinator: ``host:port`` of process 0 (the rendezvous uses ``port + 1`` too). None: the job's
      settings come from the cluster launcher as JAX detects them (``detect_job``: SLURM, Open MPI, TPU
      pod slices), and the rendezvous uses the detected coordinator's own port.
    num_processes: processes in the job (None with cluster detection).
    process_id: this process's index in ``[0, num_processes)`` (None with cluster detection).
    timeout_s: how long to wait for every peer.
    heartbeat_timeout_s: after start-up, a peer silent this long stops the job (JAX terminates the
      survivors rather than leaving them blocked in a collective).
    local_device_ids: devices of this host to use (None = all, except that JAX gives each SLURM / Open MPI
      task on GPUs only the GPU of its local rank).
    preflight: meet over our own socket first (see the module docstring). An explicit coordinator's
      meeting needs ``port + 1`` too: disable it where only the coordinator's port is reachable (a missing
      peer then aborts the process after ``timeout_s``). A detected one meets on the coordinator's port.

  Raises:
    DistributedInitError: a peer (or process 0) did not arrive within ``timeout_s``.
    ValueError: a malformed address or id, or (``coordinator=None``) no cluster environment detected.
  """
  if coordinator is not None and (num_processes is None or process_id is None):
    raise ValueError("an explicit coordinator needs num_processes and process_id")
  if coordinator is not None and preflight:
    rendezvous(coordinator, num_processes, process_id, timeout_s)
  elif coordinator is None and preflight:
    coordinator, num_processes, process_id = detect_job(num_processes, process_id, timeout_s)
    rendezvous(coordinator, num_processes, process_id, timeout_s, port_offset=0, detected=True)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=max(int(timeout_s), 1),
                             heartbeat_timeout_seconds=heartbeat_timeout_s)


def detect_job(num_processes: Optional[int] = None, process_id: Optional[int] = None,
               timeout_s: float = 60.0) -> tuple[str, int, int]:
  """The coordinator address, process count and process id ``jax.distributed.initialize`` would detect.

  Why ask JAX's own detector (SLURM, Open MPI, TPU pod slices, Kubernetes; ``JAX_COORDINATOR_ADDRESS``
  and ``JAX_COORDINATOR_PORT`` honoured, given values kept) rather than read the launcher's variables
  here: the rendezvous must meet exactly where JAX's coordinator will be, and passing the result to
  ``jax.distributed.initialize`` leaves it nothing different to detect. ``local_device_ids`` is left to
  JAX (it gives each SLURM / Open MPI task the one GPU of its local rank).

  Raises:
    ValueError: no known cluster environment (or one that does not say everything).
  """
  from jax._src import clusters  # the detector jax.distributed.initialize calls; pinned jax version
  address, count, pid, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      os.environ.get("JAX_COORDINATOR_ADDRESS"), num_processes, process_id, None, None, max(int(timeout_s), 1))
  if address is None or count is None or pid is None:
    raise ValueError("no cluster environment detected (coordinator_address, num_processes or process_id "
                     "undefined)")
  return address, count, pid


def process_clients(num_clients: int, mesh: Mesh) -> slice:
  """The contiguous range of global clients whose rows live on this process's devices."""
  sharding = NamedSharding(mesh, P("clients"))
  rows = sorted({(idx[0].start or 0, idx[0].stop if idx[0].stop is not None else num_clients)
                 for idx in sharding.addressable_devices_indices_map((num_clients,)).values()})
  start, stop = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != stop - start:
    raise ValueError(f"this process's clients are not contiguous: {rows}")
  return slice(start, stop)


def global_clients(local: Any, mesh: Mesh, num_clients: int) -> Any:
  """Global client-stacked arrays (leading axis C, split over ``'clients'``) from this process's rows.

  Args:
    local: pytree whose leaves hold this process's clients, ``process_clients(C, mesh)``, on axis 0.
    mesh: the global ``'clients'`` mesh.
    num_clients: C, the global (padded) client count.
  """
  sharding = NamedSharding(mesh, P("clients"))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (num_clients,) + tuple(np.shape(x)[1:])), local)


def global_replicated(tree: Any, mesh: Mesh) -> Any:
  """Arrays every process holds whole (server state, shared features), replicated over the mesh.

  Leaves may be host or process-local arrays (the same values on every process: a replicated stage's
  outputs), or global arrays already (a program's outputs, e.g. KD's distilled server heads): those
  replicated over ``mesh`` are kept, others are fetched (a collective) and placed again.
  """
  sharding = NamedSharding(mesh, P())

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    return jax.make_array_from_process_local_data(sharding, _host_value(x), np.shape(x))

  return jax.tree.map(one, tree)


def _host_value(x: Any) -> np.ndarray:
  """numpy copy of one leaf on every process: a replicated array from a local shard, a sharded one gathered."""
  from jax.experimental import multihost_utils
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def fetch(tree: Any) -> Any:
  """numpy copies on every process: replicated arrays from a local shard, sharded ones gathered."""
  return jax.tree.map(_host_value, tree)


def barrier(name: str, timeout_s: float) -> None:
  """Blocks until every process has reached ``barrier(name)``; a no-op in a single process.

  Why the coordination service's barrier rather than a device collective (``sync_global_devices``):
  it compiles nothing and takes an explicit deadline, so the other processes can wait for minutes
  while process 0 fills a feature cache. (Orbax and JAX's array serialization use the same one.)
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if client is None:  # a runtime joined without jax.distributed (none known today): a collective then
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays go: this process's devices (one process), or global arrays (several).

  Why one object: the trainer places each array the same way whatever the process count. With one
  process every method is exactly the ``sharding.py`` call the trainer made before multi-process runs
  existed, so single-process numbers do not move; with several, each process contributes only the
  rows of the clients its devices hold (``process_clients``) and reads results back with ``fetch``.

  Attributes:
    mesh: the ``'clients'`` mesh over every process's devices (None: one device).
    num_clients: C, the padded client count (a multiple of the mesh size).
  """
  mesh: Optional[Mesh]
  num_clients: int

  @property
  def multi(self) -> bool:
    return jax.process_count() > 1

  def clients(self, tree: Any) -> Any:
    """Client-stacked host or local arrays (leading axis C, whole on every process), split over 'clients'."""
    if not self.multi:
      return sharding.shard_clients(jax.tree.map(jnp.asarray, tree), self.mesh)
    mine = process_clients(self.num_clients, self.mesh)
    return global_clients(jax.tree.map(lambda x: np.asarray(x)[mine], tree), self.mesh, self.num_clients)

  def replicated(self, tree: Any) -> Any:
    """Arrays every process holds whole (server state, shared features), replicated over the mesh."""
    if not self.multi:
      return sharding.replicate(jax.tree.map(jnp.asarray, tree), self.mesh)
    return global_replicated(tree, self.mesh)

  def inputs(self, tree: Any, *, clients: bool) -> Any:
    """Per-call program inputs (evaluation indices): plain local arrays in one process, where jit
    places them as it always did; global arrays (client-split or replicated) across processes, where a
    program over every process's devices accepts nothing else."""
    if not self.multi:
      return jax.tree.map(jnp.asarray, tree)
    return self.clients(tree) if clients else self.replicated(tree)

  def host(self, tree: Any) -> Any:
    """numpy copies of (possibly global) arrays on every process; a collective when several."""
    return fetch(tree) if self.multi else jax.device_get(tree)
