"""A deployment's run: the server program driven through a transport, logged like ``experiments.run``.

The transport is what carries the heads between the server and the nodes: ``LocalTransport`` calls
``NodeProgram`` objects in this process (the reference for tests), ``deploy/flower_app.py`` sends Flower
messages to ClientApps on SuperNodes. Both go through :func:`run_deployment`, which runs the rounds in the
trainer's round loop (``run/rounds.py``) and writes the same run directory (metrics.jsonl / csv, plot,
summary.json, config.json) as ``experiments.run``.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Protocol, Sequence

import jax

from a2v_jax import checkpoint as ckpt_lib
from a2v_jax.config import Config
from a2v_jax.deploy.node import SPLITS, DeploymentError, NodeProgram
from a2v_jax.deploy.server import ServerProgram, wants_eval
from a2v_jax.run.log import RunLog, run_dir_for
from a2v_jax.run.rounds import Rounds, mean_after_first, run_rounds
from a2v_jax.types import Params

# evaluate replies: {node: {split: ((metrics of the global heads, rows), (metrics of the node's heads, rows))}}
EvalReplies = Mapping[int, Mapping[str, tuple[tuple[dict, int], tuple[dict, int]]]]


class Transport(Protocol):
  """How the server reaches the nodes (each call returns what the nodes that answered replied)."""

  def describe(self) -> list[dict[str, Any]]: ...

  def train(self, nodes: Sequence[int], params: Params, config: Mapping[str, int]
            ) -> dict[int, tuple[Params, dict[str, float]]]: ...

  def evaluate(self, params: Params) -> EvalReplies: ...

  # A transport whose ``aggregates`` is true (secure aggregation) has ``train_mean(nodes, params, config) ->
  # (mean heads of the nodes that answered, or None; {node: metrics})`` instead: the server never sees one
  # node's heads.


class LocalTransport:
  """Every node in this process (each with its own client state): the deployment without a network.

  Each node keeps its last ``KEEP_STATES`` states by the server round they follow (``NodeHistory``), so a server
  that restarts from an earlier checkpoint than the nodes have trained to gets the states of that round.
  """

  def __init__(self, nodes: Sequence[NodeProgram]):
    self.nodes = {n.node_id: n for n in nodes}
    self.history = {i: NodeHistory(n.init_state()) for i, n in self.nodes.items()}

  @property
  def states(self) -> dict[int, Any]:
    return {i: h.latest() for i, h in self.history.items()}

  def describe(self) -> list[dict[str, Any]]:
    return [n.describe() for n in self.nodes.values()]

  def train(self, nodes, params, config):
    out = {}
    for i in nodes:
      r = config["server_round"]
      state, metrics = self.nodes[i].train(self.history[i].at(r), params, r, config["steps"])
      self.history[i].put(r + 1, state)
      out[i] = (state.params, metrics)
    return out

  def evaluate(self, params):
    return {i: {s: (n.evaluate(params, s), n.evaluate(self.history[i].latest().params, s)) for s in SPLITS}
            for i, n in self.nodes.items()}


KEEP_STATES = 3


class NodeHistory:
  """A node's recent client states, keyed by the number of server rounds they include. Why: the server
  checkpoints every ``checkpoint_frequency`` rounds and a node may have trained past the round a restarted server
  resumes from; it must then train from the state of that round, not its newest (else its optimiser moments and
  key would be a round ahead and the resumed run would not be the uninterrupted one)."""

  def __init__(self, initial: Any = None, keep: int = KEEP_STATES, *, states: Optional[dict[int, Any]] = None):
    """From the initial state (round 0), or from ``states`` kept earlier (by round)."""
    self.states, self.keep = (dict(states) if states else {0: initial}), keep

  def at(self, server_round: int) -> Any:
    """The state to train round ``server_round`` (0-based) from: the newest that includes no later round."""
    usable = [k for k in self.states if k <= server_round]
    if not usable:
      raise DeploymentError(f"this node keeps states after rounds {sorted(self.states)}, none at or before "
                            f"{server_round}: the server resumed from further back than the node keeps "
                            f"({self.keep} states); resume the server from a later checkpoint")
    return self.states[max(usable)]

  def put(self, rounds: int, state: Any) -> None:
    self.states = {k: v for k, v in self.states.items() if k < rounds}  # a redone round replaces what followed
    self.states[rounds] = state
    for k in sorted(self.states)[:-self.keep]:
      del self.states[k]

  def latest(self) -> Any:
    return self.states[max(self.states)]


def run_deployment(cfg: Config, transport: Transport, *, verbose: bool = True,
                   on_node_failure: Optional[str] = None, resume: bool = False) -> dict[str, Any]:
  """The server side of a deployed run; returns the summary (the run directory's summary.json).

  A sampled node that does not answer a round: with ``federation.deployment_on_node_failure`` 'continue'
  the round aggregates the nodes that answered (the missing node is logged as not trained); with 'stop' the
  run ends with one line naming the node and round. Rows written before are kept either way.

  The server's state (global heads, server optimiser, round, sampling key) is checkpointed under
  ``{run}/state`` every ``checkpoint_frequency`` rounds and at the last; ``resume`` continues a killed server
  from the newest intact one (the nodes train from their states of that round, ``NodeHistory``), so the rows
  after it are the uninterrupted run's.

  Raises:
    DeploymentError: nodes that disagree with this config, a missing node with 'stop'.
  """
  policy = on_node_failure or cfg.federation.deployment_on_node_failure
  program = ServerProgram(cfg, transport.describe())  # every start-up problem before the run directory
  secure = bool(getattr(transport, "aggregates", False))
  run_dir = run_dir_for(cfg)
  log = RunLog(run_dir, resume=resume, verbose=verbose)
  checkpointer = ckpt_lib.RoundCheckpointer(run_dir / "state", max_to_keep=cfg.federation.max_to_keep)
  missing: list[dict[str, int]] = []
  start = 0
  if resume:
    found = checkpointer.restore_intact(ckpt_lib.abstract({"server": program.state}), cfg.to_dict(),
                                        print if verbose else (lambda _: None))
    if found is not None:
      state, meta = found
      program.state = jax.tree.map(jax.numpy.asarray, state["server"])
      start = int(meta["round"])
      missing = [m for m in meta.get("nodes_missing", []) if m["round"] <= start]
      log.truncate_after(start)
      if verbose:
        print(f"resumed the server from round {start} ({checkpointer.directory / str(start)})")
    else:
      log.truncate_after(0)  # rows of rounds no checkpoint holds are run again
  ckpt_lib.write_json_atomic(run_dir / "config.json", cfg.to_dict())
  if verbose:
    print(f"deployment: {program.num_nodes} node(s), {program.participants} sampled per round, "
          f"{program.steps} local steps/epoch; run directory {run_dir}")
  last = cfg.federation.global_rounds

  def save(carry, r: int, force: bool = False) -> None:
    if force or r == last or r % cfg.federation.checkpoint_frequency == 0:
      checkpointer.save(r, {"server": program.state}, cfg.to_dict(), extra={"nodes_missing": missing})

  def train(carry, r: int):
    participate = program.sample()
    chosen = [i for i in range(program.num_nodes) if participate[i]]
    if secure:
      mean, metrics = transport.train_mean(chosen, program.params, program.round_config())
    else:
      replies = transport.train(chosen, program.params, program.round_config())
      metrics = {i: m for i, (_, m) in replies.items()}
    lost = [i for i in chosen if i not in metrics]
    if lost and policy == "stop":
      raise DeploymentError(f"node(s) {lost} did not answer round {r}; stopping (deployment_on_node_failure="
                            f"'stop'; rounds 1..{r - 1} are in {run_dir / 'metrics.jsonl'})")
    missing.extend({"round": r, "node": i} for i in lost)
    if secure:
      if mean is None:
        raise DeploymentError(f"secure aggregation halted in round {r}: too few nodes answered to unmask the sum "
                              f"(the nodes' errors are above; rounds 1..{r - 1} are in {run_dir / 'metrics.jsonl'})")
      program.apply_mean(mean)
    else:
      program.aggregate({i: p for i, (p, _) in replies.items()}, participate)
    row = program.train_row(metrics)
    if lost:
      row["server/nodes_missing"] = len(lost)
    return carry, row

  def evaluate(carry, r: int):
    if not wants_eval(cfg, r):
      return carry, {}
    replies = transport.evaluate(program.params)
    return carry, program.eval_row({i: {s: v[s][0] for s in v} for i, v in replies.items()},
                                   {i: {s: v[s][1] for s in v} for i, v in replies.items()})

  t0 = time.time()
  try:
    _, times = run_rounds(None, Rounds([train], [evaluate], save=save), start=start, last=last, log=log,
                          verbose=verbose)
  finally:
    checkpointer.close()
  return log.finish(cfg, extra={"deployment": True, "nodes": program.num_nodes,
                                "mean_round_seconds_after_first": mean_after_first(times),
                                "rounds_per_second": (last - start) / max(time.time() - t0, 1e-9),
                                "nodes_missing": missing, "devices": str(jax.devices()[0].platform)})
