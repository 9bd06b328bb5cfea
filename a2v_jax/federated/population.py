"""Rounds over a population larger than memory: only the sampled cohort is ever on the device.

Cross-device studies (10^5-10^6 clients, 10^2-10^3 per round) cannot hold every client's state, nor run every
client's program. Here a round is: sample m of the population with the server's key (``engine.sample_cohort``,
the same draw as the in-memory ``engine.cohort_round``), build the cohort's data on demand (``data_fn(ids)``: a
client's rows are a function of its id, the same whenever it is sampled), get the cohort's states, run the engine's
``cohort_step`` on them (one jitted program for the m clients: local training vmapped, FedAvg, server step), and
keep what persists:

* ``client_state: "persistent"`` (the reference's: a node keeps its heads and optimiser state between rounds) --
  the population's states live in a :class:`ClientStore` on the host (numpy arrays, or ``np.memmap`` files under a
  directory for populations larger than memory); the cohort is gathered from it and written back. The device holds
  the cohort only. SCAFFOLD's client controls are part of the state, so they live there too.
* ``"stateless"`` (cross-device FedAvg): each participant starts from the global model with a fresh optimiser
  state and a key drawn from (round, client id) (``engine.fresh_clients``, as ``client_state: stateless`` in a run);
  nothing is kept per client, so a million clients cost nothing.

With a persistent store and population = the engine's C, every number equals ``engine.cohort_round``'s (tested).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.federated import engine
from a2v_jax.federated.local import Shared
from a2v_jax.federated.state import ClientState, ServerState

CLIENT_STATES = ("persistent", "stateless")


class ClientStore:
  """The population's client states on the host: one array per leaf with a leading population axis.

  ``directory`` None keeps them in RAM; a directory holds one ``np.memmap`` file per leaf (for populations
  whose states exceed memory; the OS pages in what a round gathers).
  """

  def __init__(self, stacked: ClientState, directory: Optional[str | Path] = None, *, broadcast: int = 0):
    """From ``stacked`` states (leading population axis), or with ``broadcast`` = P from ONE client's state
    copied P times (then :meth:`set_keys` gives each client its own key)."""
    leaves, self.treedef = jax.tree.flatten(stacked)
    self.directory = None if directory is None else Path(directory)
    if self.directory is not None:
      self.directory.mkdir(parents=True, exist_ok=True)
    self.leaves = []
    for i, leaf in enumerate(leaves):
      leaf = np.asarray(jax.device_get(leaf))
      shape = ((broadcast,) if broadcast else ()) + leaf.shape
      if self.directory is None:
        arr = np.empty(shape, leaf.dtype)
      else:
        arr = np.lib.format.open_memmap(self.directory / f"leaf_{i:03d}.npy", mode="w+", dtype=leaf.dtype,
                                        shape=shape)
      arr[...] = leaf
      self.leaves.append(arr)
    self.population = int(self.leaves[0].shape[0])

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.leaves)

  def set_keys(self, keys: np.ndarray) -> None:
    """Writes every client's key (the ``rng`` leaf), (population, ...) like the engine's ``init_keys``."""
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(jax.tree.unflatten(self.treedef, self.leaves))[0]]
    self.leaves[paths.index(".rng")][...] = np.asarray(keys)

  def gather(self, ids: np.ndarray) -> ClientState:
    """The states of clients ``ids`` (sorted), stacked, as device arrays."""
    return jax.tree.unflatten(self.treedef, [jnp.asarray(x) for x in self.gather_host(ids)])

  def gather_host(self, ids: np.ndarray) -> list[np.ndarray]:
    """Copies of the leaves' rows ``ids`` (host arrays; numpy releases the GIL while it copies)."""
    return [np.take(a, ids, axis=0) for a in self.leaves]

  def scatter(self, ids: np.ndarray, state: ClientState) -> None:
    """Writes the states of clients ``ids`` back."""
    self.scatter_host(ids, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))])

  def scatter_host(self, ids: np.ndarray, leaves: list[np.ndarray]) -> None:
    for a, leaf in zip(self.leaves, leaves, strict=True):
      a[ids] = leaf

  def arrays(self) -> list[np.ndarray]:
    return self.leaves

  def load(self, leaves: list[Any]) -> None:
    """Overwrites every client's state with ``leaves`` (a restored checkpoint's, same shapes)."""
    for a, b in zip(self.leaves, leaves, strict=True):
      a[...] = np.asarray(b)


@dataclasses.dataclass
class PopulationRound:
  """One round over ``population`` clients with ``cohort`` participants (see the module docstring).

  ``data_fn(ids) -> (idx (m, steps*B), count (m,))`` gives the sampled clients' rows (numpy or jax);
  ``store`` is the persistent states' :class:`ClientStore` (None = stateless).
  """
  alg: engine.Algorithm
  cfg: Any
  population: int
  cohort: int
  data_fn: Callable[[np.ndarray], tuple[Any, Any]]
  store: Optional[ClientStore] = None

  def __post_init__(self):
    from a2v_jax.federated import optim
    tx, cfg, pop, m = optim.client_optimizer(self.cfg), self.cfg, self.population, self.cohort

    def sample(rng):
      rng, chosen = engine.sample_cohort(rng, pop, m) if m < pop else (jax.random.split(rng)[0], jnp.arange(pop))
      return rng, jnp.sort(chosen)

    self._sample = jax.jit(sample)
    self._fresh = jax.jit(lambda server, ids: engine.fresh_clients(cfg, tx, server, ids))
    self._step = jax.jit(self.alg.cohort_step, donate_argnums=(0, 1))
    self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1) if self.store is not None else None
    self._pending = None   # (ids, trained on the device): the last round's states, not yet in the store
    self._next = None      # (ids, future of their host states): the next round's cohort, gathered ahead

  def __call__(self, server: ServerState, shared: Shared, holders: Optional[int] = None
               ) -> tuple[ServerState, dict[str, Any], np.ndarray]:
    """(server, the cohort's metrics, the cohort's ids); ``holders``: clients of the population with rows
    (SCAFFOLD's N; default every client).

    A persistent store is pipelined with the device: while round r trains, a worker thread writes round r-1's
    states back and gathers round r+1's cohort (its ids follow from round r's key before round r runs); the rows
    of round r+1 that round r trains are then taken from round r's result, not the store. So the store is behind
    by one round until :meth:`flush` (called by ``save`` / ``restore``)."""
    rng, ids = self._sample(server.rng)
    ids = np.asarray(ids)
    idx, count = self.data_fn(ids)
    data = engine.RoundData(jnp.asarray(idx, jnp.int32), jnp.asarray(count, jnp.int32))
    holders = jnp.asarray(self.population if holders is None else holders, jnp.int32)
    if self.store is None:
      server, _, metrics = self._step(server, self._fresh(server, jnp.asarray(ids)), data, shared, rng, holders)
      return server, metrics, ids
    sub, last = self._cohort(ids)
    server, trained, metrics = self._step(server, sub, data, shared, rng, holders)
    _, next_ids = self._sample(rng)  # the next round's cohort: its key is this round's
    next_ids = np.asarray(next_ids)
    if last is not None:
      self._worker.submit(self.store.scatter_host, *last)
    self._next = (next_ids, self._worker.submit(self.store.gather_host, next_ids))
    self._pending = (ids, trained)
    return server, metrics, ids

  def _cohort(self, ids: np.ndarray) -> tuple[ClientState, Optional[tuple[np.ndarray, list[np.ndarray]]]]:
    """The cohort's states on the device, and the last round's (ids, host states) still to be written back."""
    last = None
    if self._pending is not None:
      last_ids, trained = self._pending
      last = (last_ids, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trained))])
      self._pending = None
    if self._next is not None and np.array_equal(self._next[0], ids):
      leaves = self._next[1].result()
    else:  # nothing gathered ahead (first round, or the server was replaced): write back, then gather here
      if self._next is not None:
        self._next[1].result()
      if last is not None:
        self.store.scatter_host(*last)
        last = None
      leaves = self.store.gather_host(ids)
    self._next = None
    if last is not None:  # rows the last round trained are newer than the store's (written back meanwhile)
      both = np.flatnonzero(np.isin(ids, last[0]))
      src = np.searchsorted(last[0], ids[both])  # (cohorts are sorted)
      for leaf, new in zip(leaves, last[1]):
        leaf[both] = new[src]
    return jax.tree.unflatten(self.store.treedef, [jnp.asarray(x) for x in leaves]), last

  def flush(self) -> None:
    """Writes every trained state back to the store and drops what was gathered ahead (the store is then exact)."""
    if self.store is None:
      return
    if self._next is not None:
      self._next[1].result()
      self._next = None
    self._worker.submit(lambda: None).result()  # earlier write-backs done
    if self._pending is not None:
      ids, trained = self._pending
      self.store.scatter_host(ids, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trained))])
      self._pending = None

  def checkpoint_state(self, server: ServerState) -> dict[str, Any]:
    """What a round checkpoint holds: the server and (persistent) the whole store, host arrays as they are."""
    self.flush()
    return {"server": server, "store": list(self.store.leaves) if self.store is not None else []}

  def save(self, checkpointer: Any, server: ServerState, config: dict) -> None:
    """Writes the round ``server.round`` just finished: server + store, checksummed (``checkpoint.RoundCheckpointer``;
    a memmap store is copied, so its cost is the store's size: checkpoint every k rounds at large populations)."""
    checkpointer.save(int(server.round), self.checkpoint_state(server), config,
                      extra={"population": self.population, "cohort": self.cohort,
                             "client_state": "persistent" if self.store is not None else "stateless"})

  def restore(self, checkpointer: Any, server: ServerState, config: dict,
              say: Callable[[str], None] = print) -> Optional[ServerState]:
    """Resumes from the newest intact round (a damaged one is set aside, ``restore_intact``): the store is
    overwritten with the saved one and the saved server returned; None when nothing was saved. The next rounds
    then give the numbers of the uninterrupted run, bit for bit (sampling and keys come from the server state)."""
    from a2v_jax import checkpoint as ckpt_lib
    found = checkpointer.restore_intact(ckpt_lib.abstract(self.checkpoint_state(server)), config, say)
    if found is None:
      return None
    state, meta = found
    if self.store is not None:
      self.store.load(state["store"])  # (checkpoint_state above flushed the pipeline)
    say(f"resumed the population of {self.population} at round {meta['round']}")
    return jax.tree.map(jnp.asarray, state["server"])


def make_population_round(cfg: Any, apply_fn: Callable, init_fn: Callable, *, steps: int, population: int,
                          cohort: int, data_fn: Callable, client_state: Optional[str] = None,
                          template: Optional[ClientState] = None, keys: Optional[np.ndarray] = None,
                          store_dir: Optional[str | Path] = None) -> PopulationRound:
  """The engine for ``population`` clients (join_ratio = cohort / population) and its round driver.

  Persistent: ``template`` (one client's initial state) fills the store, ``keys`` (population, ...) its keys.
  ``client_state`` None: the config's ``client_state``.
  """
  client_state = client_state or cfg.federation.client_state
  if client_state not in CLIENT_STATES:
    raise ValueError(f"client_state must be one of {CLIENT_STATES}, got {client_state!r}")
  if not 1 <= cohort <= population:
    raise ValueError(f"cohort {cohort} must be in [1, population {population}]")
  fed = dataclasses.replace(cfg.federation, join_ratio=cohort / population)
  cfg = dataclasses.replace(cfg, federation=fed)
  alg = engine.fed_a2v(cfg, apply_fn, init_fn, steps=steps, num_clients=population)
  store = None
  if client_state == "persistent":
    if template is None:
      raise ValueError("a persistent population needs the template client state")
    store = ClientStore(template, store_dir, broadcast=population)
    if keys is not None:
      store.set_keys(keys)
  return PopulationRound(alg, cfg, population, cohort, data_fn, store)
