"""Flower's ClientApp and ServerApp over the deployment programs (the optional extra ``[flower]``).

A thin adapter: the ClientApp owns one node (``NodeProgram``: that node's rows of the same dataset,
partition and feature cache as ``experiments.run``) and answers three message types -- ``query`` (its
description, checked by the server), ``train`` (the engine's local program from the global heads) and
``evaluate`` (the global and its own heads on its val / test rows); the ServerApp runs
``run_deployment`` with :class:`FlowerTransport`, so sampling, aggregation, the server step and the run
directory are the simulation's own. The same config file drives both: the run config names it
(``config``, plus ``set``: ``key=value`` overrides separated by ``;``) and each SuperNode's node config
names its node (``partition-id``).

Between rounds a node's client state (AdamW moments, its key) lives in Flower's ``Context.state``, so it
survives however the SuperNode runs its ClientApp.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from a2v_jax.config import Config
from a2v_jax.deploy import secure
from a2v_jax.deploy.node import SPLITS, DeploymentError, NodeProgram
from a2v_jax.deploy.run import EvalReplies, NodeHistory, run_deployment
from a2v_jax.errors import A2VError
from a2v_jax.types import Params

STATE_KEY = "a2v_client_state_r"  # + the number of rounds the state includes
# How long the server waits for every node to connect, and for a round's replies (run config entries
# connect-timeout-s / reply-timeout-s): a node silent past the reply timeout is a lost node.
CONNECT_TIMEOUT_S = 600.0
REPLY_TIMEOUT_S = 3600.0
# How long a round waits for a node Flower reports unavailable to come back (run config rejoin-wait-s): Flower
# marks a dead SuperNode unavailable after 2 missed heartbeats (~60 s) and refuses its restart until then, so a
# restarted node rejoins 1-2 minutes after it died. Asked again every REJOIN_POLL_S.
REJOIN_WAIT_S = 300.0
REJOIN_POLL_S = 5.0


def load_run_config(run_config: Mapping[str, Any]) -> Config:
  """The experiment config a Flower run config names (``config`` path, optional ``set`` overrides)."""
  from a2v_jax.reference.config import load_config
  if "config" not in run_config:
    raise DeploymentError("the Flower run config has no 'config' entry naming the experiment config file "
                          "(flwr run --run-config \"config='experiments/configs/x.json'\")")
  overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
  return load_config(str(run_config["config"]), overrides)


def params_record(params: Params) -> ArrayRecord:
  return ArrayRecord(array_dict={k: Array.from_numpy_ndarray(np.asarray(v))
                                 for k, v in traverse_util.flatten_dict(params, sep="/").items()})


def record_params(record: ArrayRecord) -> Params:
  return traverse_util.unflatten_dict({k: jnp.asarray(v.numpy()) for k, v in record.items()}, sep="/")


def _state_record(state: Any) -> ArrayRecord:
  return ArrayRecord(array_dict={f"{i:05d}": Array.from_numpy_ndarray(np.asarray(x))
                                 for i, x in enumerate(jax.tree.leaves(state))})


# ---------------------------------------------------------------------------------------------
# The node's side.


def make_client_app(prepare: Optional[Callable[[Config], Any]] = None, mods: Sequence[Any] = ()) -> ClientApp:
  """The ClientApp; ``prepare(cfg)`` gives the trainer's ``Prepared`` (tests pass synthetic data), else the
  node prepares from the config like ``experiments.run``. ``mods``: Flower mods around every message, after
  the SecAgg+ one (which acts only on a secure round's messages)."""
  app = ClientApp(mods=[secure.secure_aggregation_mod, *mods])
  programs: dict[tuple, tuple[NodeProgram, Any]] = {}  # per process: features and compiled programs kept

  def node(context: Context) -> tuple[NodeProgram, Any]:
    if "partition-id" not in context.node_config:
      raise DeploymentError("this SuperNode's node config has no 'partition-id' (start it with "
                            "--node-config \"partition-id=0\")")
    root = context.node_config.get("dataset-root")  # the node's own folder: it holds only its own clips
    key = (str(context.run_config.get("config")), str(context.run_config.get("set", "")),
           int(context.node_config["partition-id"]), root)
    if key not in programs:
      cfg = load_run_config(context.run_config)
      _persistent_xla_cache(cfg)
      if root is not None:
        program = NodeProgram.build(cfg, key[2], dataset_root=str(root))
      else:
        program = NodeProgram.build(cfg, key[2], prepare(cfg) if prepare else None)
      programs[key] = (program, jax.tree.structure(jax.eval_shape(program.init_state)))  # (shapes only)
    return programs[key]

  def history(context: Context, program: NodeProgram, treedef: Any) -> NodeHistory:
    """The node's last states by round: in Flower's ``Context.state`` (one run), else from the node's
    ``state-dir`` (node config; survives a restarted ServerApp, which is a new run), else the initial state."""
    states = {int(k[len(STATE_KEY):]): jax.tree.unflatten(treedef, [jnp.asarray(v[i].numpy()) for i in sorted(v)])
              for k, v in context.state.items() if k.startswith(STATE_KEY)}
    if not states and (folder := _state_dir(context, program)) is not None and folder.is_dir():
      for f in folder.glob("state_*.npz"):
        with np.load(f) as z:
          states[int(f.stem.split("_")[1])] = jax.tree.unflatten(treedef, [jnp.asarray(z[k]) for k in sorted(z)])
    return NodeHistory(states=states) if states else NodeHistory(program.init_state())  # (initialised once)

  def keep(context: Context, program: NodeProgram, h: NodeHistory, new: int) -> None:
    """Writes round ``new``'s state (just put: it may replace one of a rolled-back round) and any other state of
    ``h`` not yet kept into ``Context.state`` and the state-dir, and drops the states ``h`` let go."""
    for k in [k for k in context.state.keys() if k.startswith(STATE_KEY) and int(k[len(STATE_KEY):]) not in h.states]:
      del context.state[k]
    for r, state in h.states.items():
      if r == new or f"{STATE_KEY}{r}" not in context.state:
        context.state[f"{STATE_KEY}{r}"] = _state_record(state)
    if (folder := _state_dir(context, program)) is not None:
      folder.mkdir(parents=True, exist_ok=True)
      for r, state in h.states.items():
        path = folder / f"state_{r}.npz"
        if r == new or not path.exists():
          tmp = folder / f".state_{r}.tmp.npz"
          np.savez(tmp, **{f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})
          tmp.replace(path)
      for f in folder.glob("state_*.npz"):
        if int(f.stem.split("_")[1]) not in h.states:
          f.unlink()

  @app.query()
  def query(msg: Message, context: Context) -> Message:
    program, _ = node(context)
    return Message(RecordDict({"node": ConfigRecord({"describe": json.dumps(program.describe())})}), reply_to=msg)

  @app.train()
  def train(msg: Message, context: Context) -> Message:
    program, treedef = node(context)
    secure_round = secure.is_fit_ins(msg)  # a SecAgg+ round: its reply is masked by secure_aggregation_mod
    if secure_round:
      global_params, config = secure.read_fit_ins(msg)
    else:
      global_params, config = record_params(msg.content["arrays"]), msg.content["config"]
    h, r = history(context, program, treedef), int(config["server_round"])
    state, metrics = program.train(h.at(r), global_params, r, int(config["steps"]))
    if secure_round:  # (checked before the state is kept: a refused update leaves the node as it was)
      reply = secure.fit_res(msg, state.params, global_params, config, len(program.train_rows), metrics)
    else:
      metrics["num-examples"] = len(program.train_rows)
      reply = Message(RecordDict({"arrays": params_record(state.params), "metrics": MetricRecord(metrics)}),
                      reply_to=msg)
    h.put(r + 1, state)
    keep(context, program, h, r + 1)
    return reply

  @app.evaluate()
  def evaluate(msg: Message, context: Context) -> Message:
    program, treedef = node(context)
    own = history(context, program, treedef).latest().params
    out: dict[str, float] = {}
    for role, params in (("server", record_params(msg.content["arrays"])), ("node", own)):
      for split in SPLITS:
        metrics, rows = program.evaluate(params, split)
        out[f"{role}/{split}/rows"] = rows
        out.update({f"{role}/{split}/{k}": v for k, v in metrics.items()})
    return Message(RecordDict({"metrics": MetricRecord(out)}), reply_to=msg)

  return app


def _persistent_xla_cache(cfg: Config) -> None:
  """Flower starts a ClientApp process per message; without a persistent compilation cache each one recompiles
  the node's programs (measured: 18.4 s for the first train call, 3.1 s with the cache). The node's own
  ``cache_dir/xla`` unless ``JAX_COMPILATION_CACHE_DIR`` says otherwise."""
  import os
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR") and jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", str(Path(cfg.features.cache_dir) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _state_dir(context: Context, program: NodeProgram) -> Optional[Path]:
  folder = context.node_config.get("state-dir")
  return None if folder is None else Path(str(folder)) / program.cfg.experiment.name / f"node_{program.node_id}"


# ---------------------------------------------------------------------------------------------
# The server's side.


def _ok(replies: Mapping[int, Message], what: str, strict: bool, name: Callable[[int], str] = str
        ) -> dict[int, Message]:
  """The replies without an error (by Flower node id); each error is reported naming its node -- or, with
  ``strict``, ends the run."""
  good = {}
  for node, r in replies.items():
    if r.has_error():
      line = f"node {name(node)} failed the {what}: {r.error.reason}"
      if strict:
        raise DeploymentError(line)
      print(f"server: {line}", file=sys.stderr)
      continue
    good[node] = r
  return good


def _metrics_of(reply: Message, role: str, split: str) -> tuple[dict[str, float], int]:
  """(metrics, rows) of one model (``role``: server / node) on one split, from an evaluate reply's
  ``{role}/{split}/{metric}`` entries."""
  prefix = f"{role}/{split}/"
  m = reply.content["metrics"]
  return ({k[len(prefix):]: float(v) for k, v in m.items() if k.startswith(prefix) and k != prefix + "rows"},
          int(m[prefix + "rows"]))


class FlowerTransport:
  """``deploy.run.Transport`` over a Flower ``Grid``: our node ids <-> Flower's node ids, records <-> arrays."""

  def __init__(self, grid: Grid, cfg: Config, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
               reply_timeout_s: float = REPLY_TIMEOUT_S, rejoin_wait_s: float = REJOIN_WAIT_S,
               context: Optional[Context] = None):
    """``context``: the ServerApp's; its run config's ``secure-aggregation=true`` makes every round a SecAgg+
    round (``deploy/secure.py``): the server then gets the participants' mean, never one node's heads."""
    self.grid, self.cfg, self.context = grid, cfg, context
    self.connect_timeout_s, self.reply_timeout_s = connect_timeout_s, reply_timeout_s
    self.rejoin_wait_s = rejoin_wait_s
    self.flower_id: dict[int, int] = {}
    self.node_of: dict[int, int] = {}  # Flower node id -> partition id
    self.round = 0
    self.secure: Optional[secure.SecureAggregator] = None

  @property
  def aggregates(self) -> bool:
    """Whether rounds go through ``train_mean`` (secure aggregation) rather than ``train``."""
    return self.context is not None and secure.wanted(self.context.run_config)

  def _send(self, node_ids: Sequence[int], kind: str, content: Callable[[], RecordDict]) -> dict[int, Message]:
    """Each node's reply (or error) by Flower node id, within the reply timeout. A node Flower reports unavailable
    (it missed its heartbeats: a SuperNode that died) is asked again every ``REJOIN_POLL_S`` for ``rejoin-wait-s``
    (run config): a restarted SuperNode answers the round from its kept state, so the round is the one it would
    have been. Its error stands once the wait is over."""
    deadline = time.time() + self.reply_timeout_s
    rejoin_until = min(time.time() + self.rejoin_wait_s, deadline)
    todo, replies = list(node_ids), {}
    while todo:
      msgs = [Message(content(), dst_node_id=i, message_type=kind, group_id=str(self.round)) for i in todo]
      got = list(self.grid.send_and_receive(msgs, timeout=max(deadline - time.time(), 1.0)))
      node_of_msg = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
      todo = []
      for r in got:
        node = node_of_msg.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
        replies[node] = r
        if r.has_error() and r.error.code == ErrorCode.NODE_UNAVAILABLE and time.time() < rejoin_until:
          todo.append(node)
      if todo:
        print(f"server: node(s) {[self._name(n) for n in todo]} unavailable in the {kind} of round {self.round}; "
              f"asking again until they rejoin (rejoin-wait-s, {max(rejoin_until - time.time(), 0):.0f} s left)",
              file=sys.stderr)
        time.sleep(REJOIN_POLL_S)
    return replies

  def _name(self, flower_node: int) -> str:
    return (f"{self.node_of[flower_node]} (Flower node {flower_node})" if flower_node in self.node_of
            else f"(Flower node {flower_node})")

  def describe(self) -> list[dict[str, Any]]:
    want = self.cfg.data.num_nodes
    deadline = time.time() + self.connect_timeout_s
    while len(ids := list(self.grid.get_node_ids())) < want:
      if time.time() > deadline:
        raise DeploymentError(f"{len(ids)} of {want} node(s) connected within {self.connect_timeout_s:.0f} s")
      time.sleep(0.5)
    replies = _ok(self._send(ids, "query", RecordDict), "start-up query", strict=True, name=self._name)
    out = []
    for flower_node, r in replies.items():
      d = json.loads(r.content["node"]["describe"])
      if d["node_id"] in self.flower_id:
        raise DeploymentError(f"two SuperNodes ({self.flower_id[d['node_id']]} and {flower_node}) "
                              f"hold partition-id {d['node_id']}")
      self.flower_id[d["node_id"]] = flower_node
      out.append(d)
    self.node_of = {f: i for i, f in self.flower_id.items()}
    if self.aggregates:
      from a2v_jax.federated import engine
      self.secure = secure.SecureAggregator(
          self.context.run_config, self.cfg.federation.adapter_aggregation_mode == "weighted",
          max(int(d["train_count"]) for d in out), engine.num_participants(self.cfg, len(out)), self.reply_timeout_s)
    return out

  def train(self, nodes, params, config):
    self.round += 1
    arrays = params_record(params)
    replies = _ok(self._send([self.flower_id[i] for i in nodes], "train",
                             lambda: RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))})),
                  f"round {self.round}", strict=False, name=self._name)
    out = {}
    for flower_node, r in replies.items():
      metrics = {k: float(v) for k, v in r.content["metrics"].items() if k != "num-examples"}
      out[self.node_of[flower_node]] = (record_params(r.content["arrays"]), metrics)
    return out

  def train_mean(self, nodes, params, config):
    """One SecAgg+ round: (the participants' mean heads, or None when it halted; metrics by node)."""
    self.round += 1
    reporting = secure.ReportingGrid(
        self.grid, lambda r: _ok({r.metadata.src_node_id: r}, f"round {self.round}", strict=False, name=self._name))
    mean, metrics = self.secure.round(reporting, self.context, [self.flower_id[i] for i in nodes], params,
                                      config, self.round)
    return mean, {self.node_of[f]: m for f, m in metrics.items()}

  def evaluate(self, params) -> EvalReplies:
    arrays = params_record(params)
    replies = _ok(self._send(list(self.flower_id.values()), "evaluate", lambda: RecordDict({"arrays": arrays})),
                  f"evaluation of round {self.round}", strict=False, name=self._name)
    return {self.node_of[f]: {s: (_metrics_of(r, "server", s), _metrics_of(r, "node", s)) for s in SPLITS}
            for f, r in replies.items()}


def make_server_app(verbose: bool = True) -> ServerApp:
  """The ServerApp: ``run_deployment`` over the grid; a project error ends it with one line."""
  app = ServerApp()

  @app.main()
  def main(grid: Grid, context: Context) -> None:
    try:
      cfg = load_run_config(context.run_config)
      rc = context.run_config
      transport = FlowerTransport(grid, cfg, connect_timeout_s=float(rc.get("connect-timeout-s", CONNECT_TIMEOUT_S)),
                                  reply_timeout_s=float(rc.get("reply-timeout-s", REPLY_TIMEOUT_S)),
                                  rejoin_wait_s=float(rc.get("rejoin-wait-s", REJOIN_WAIT_S)), context=context)
      resume = str(rc.get("resume", "false")).lower() in ("1", "true", "yes")
      run_deployment(cfg, transport, verbose=verbose, resume=resume)
    except A2VError as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(2) from None

  return app


# What Flower loads (pyproject's [tool.flwr.app.components]).
client_app = make_client_app()
server_app = make_server_app()


# ---------------------------------------------------------------------------------------------
# Flower's messages and apps in one process, without a network or the Ray simulation backend.


class InProcessGrid(Grid):
  """A Grid whose nodes are a ClientApp in this process, one Context (its state) per node.

  Why: the same ServerApp and ClientApp code as a deployment, message for message, for tests and quick
  checks, without Flower's simulation engine (which needs Ray). Node ids are Flower-like large ints, not
  the partition ids, so the id mapping is exercised.
  """

  def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any],
               drop: Optional[Callable[[Message], Any]] = None, node_config: Optional[Mapping[str, Any]] = None):
    """``drop(msg)``: True loses the message (a node that never answers), an ``Error`` is the reply instead."""
    self.client_app = client_app
    self.drop = drop or (lambda m: False)
    self.contexts = {7919 * (i + 1): Context(run_id=1, node_id=7919 * (i + 1),
                                             node_config={"partition-id": i, "num-partitions": num_nodes,
                                                          **(node_config or {})},
                                             state=RecordDict(), run_config=dict(run_config))
                     for i in range(num_nodes)}
    self._replies: dict[str, Message] = {}
    self._ids = itertools.count()

  def set_run(self, run: Any) -> None:
    self._run = run

  @property
  def run(self) -> Any:
    return getattr(self, "_run", None)

  def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                     ttl: Optional[float] = None) -> Message:
    return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

  def get_node_ids(self) -> Iterable[int]:
    return list(self.contexts)

  def _deliver(self, msg: Message) -> Optional[Message]:
    verdict = self.drop(msg)
    if isinstance(verdict, Error):  # what the SuperLink answers for a node that is away (e.g. NODE_UNAVAILABLE)
      return Message(verdict, reply_to=msg)
    if verdict:
      return None
    msg = copy.deepcopy(msg)  # what a node receives is its own (over a network, it is deserialised)
    try:
      return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
    except Exception as e:  # a ClientApp exception reaches the server as an error reply, as in Flower
      return Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg)

  def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
    ids = []
    for m in messages:
      ids.append(f"{next(self._ids)}")
      m.metadata.__dict__["_message_id"] = ids[-1]  # (Flower's grids set the id of what they push)
      reply = self._deliver(m)
      if reply is not None:  # a dropped message gets an id that never has a reply, as a lost node's
        self._replies[ids[-1]] = reply
    return ids

  def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
    return [self._replies.pop(i) for i in message_ids if i in self._replies]

  def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
    return self.pull_messages(list(self.push_messages(messages)))


def run_in_process(run_config: Mapping[str, Any], num_nodes: int, *, client: Optional[ClientApp] = None,
                   server: Optional[ServerApp] = None, drop: Optional[Callable[[Message], bool]] = None,
                   node_config: Optional[Mapping[str, Any]] = None) -> None:
  """The ServerApp and ``num_nodes`` ClientApps of one run, exchanging Flower messages in this process
  (``node_config``: entries every SuperNode is given besides its partition id)."""
  from flwr.common.constant import SUPERLINK_NODE_ID
  from flwr.supercore.task_identity import TaskIdentity
  grid = InProcessGrid(client or client_app, num_nodes, run_config, drop, node_config)
  saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
  # what Flower's ServerApp process sets before its messages are made (they carry these ids)
  TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
  try:
    (server or server_app)(grid, Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                         run_config=dict(run_config)))
  finally:
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
