"""Secure aggregation of the heads through Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the nodes): the server learns only the weighted mean of the participants' updates.

Why this shape: Flower 1.42 runs SecAgg+ inside its legacy Strategy workflow (``LegacyContext``, ``FitIns`` /
``FitRes``), while our ServerApp is a loop over the grid with the engine's sampling and server step. So a round
builds a one-round Strategy around our choices (:class:`_OneRound`: these nodes, these global heads; its
``aggregate_fit`` receives the unmasked mean and keeps it), and the nodes answer the legacy ``FitIns`` with their
*update* (trained heads minus the global heads) in a ``FitRes`` whose ``num_examples`` is the node's FedAvg weight.
Updates rather than heads: SecAgg+ clips to [-c, c] and quantises to ``quantization_range`` levels, so values of
a round's size (1e-3 .. 1e-1) keep ~7 significant digits with c = 1 where whole heads would need c >= 8. A node
whose update leaves [-c, c] fails the round with a message naming ``secagg-clipping-range`` (SecAgg+ would clip
it silently). The mean is exact up to SecAgg+'s stochastic rounding: within (participants x 2c / 2^22) of plain
FedAvg, not bit for bit.

Run config (``flwr run --run-config``): ``secure-aggregation=true``; ``secagg-clipping-range`` (c, default 1.0);
``secagg-num-shares`` / ``secagg-threshold`` (ints, or fractions of the participants / shares; defaults 1.0 and
0.67: every participant holds a share of every other's key, two thirds of them recover a dropped one).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import Strategy

from a2v_jax.deploy.node import DeploymentError
from a2v_jax.types import Params

SECAGG_CONFIGS = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS
DEFAULTS = {"secagg-clipping-range": 1.0, "secagg-num-shares": 1.0, "secagg-threshold": 0.67}


def wanted(run_config: Mapping[str, Any]) -> bool:
  return str(run_config.get("secure-aggregation", "false")).lower() in ("1", "true", "yes")


def _number(run_config: Mapping[str, Any], key: str) -> float | int:
  """A run config entry as Flower's workflow reads it: an int is a count, a float a fraction."""
  v = run_config.get(key, DEFAULTS[key])
  try:
    return int(v) if isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()) else float(v)
  except ValueError:
    raise DeploymentError(f"run config '{key}' must be a number, got {v!r}") from None


# ---------------------------------------------------------------------------------------------
# The node's side.


def secure_aggregation_mod(msg: Message, context: Context, call_next: Callable) -> Message:
  """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round, the app's own handlers for the rest
  (``secaggplus_mod`` alone fails on any train message without SecAgg+ configs)."""
  if msg.metadata.message_type == "train" and SECAGG_CONFIGS in msg.content.config_records:
    from flwr.client.mod import secaggplus_mod
    return secaggplus_mod(msg, context, call_next)
  return call_next(msg, context)


def is_fit_ins(msg: Message) -> bool:
  """A SecAgg+ round's train message (the legacy ``FitIns`` records) rather than ours."""
  return "fitins.parameters" in msg.content.array_records


def read_fit_ins(msg: Message) -> tuple[Params, dict[str, Any]]:
  """(global heads, round config) of a SecAgg+ train message."""
  from flwr.compat.common.recorddict_compat import recorddict_to_fitins
  ins = recorddict_to_fitins(msg.content, keep_input=True)
  keys = json.loads(ins.config["heads-keys"])
  params = traverse_util.unflatten_dict(dict(zip(keys, parameters_to_ndarrays(ins.parameters))), sep="/")
  return params, dict(ins.config)


def fit_res(msg: Message, trained: Params, global_params: Params, config: Mapping[str, Any], rows: int,
            metrics: Mapping[str, float]) -> Message:
  """The node's reply: its update and its FedAvg weight, which ``secaggplus_mod`` masks before it leaves.

  Raises:
    DeploymentError: an update outside [-c, c] (SecAgg+ would clip it silently).
  """
  from flwr.compat.common.recorddict_compat import fitres_to_recorddict
  keys = json.loads(config["heads-keys"])
  new, old = traverse_util.flatten_dict(trained, sep="/"), traverse_util.flatten_dict(global_params, sep="/")
  update = [np.asarray(new[k], np.float64) - np.asarray(old[k], np.float64) for k in keys]
  c = float(config["secagg-clipping-range"])
  largest = max(float(np.abs(u).max()) for u in update)
  if largest > c:
    raise DeploymentError(f"this node's update reaches {largest:.3g}, outside SecAgg+'s clipping range {c:g}: raise "
                          "the run config's secagg-clipping-range (each node's update must fit in [-c, c])")
  weight = rows if config["weigh-by-rows"] else 1
  res = FitRes(status=Status(Code.OK, "ok"), parameters=ndarrays_to_parameters(update), num_examples=int(weight),
               metrics={k: float(v) for k, v in metrics.items()})
  return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)


# ---------------------------------------------------------------------------------------------
# The server's side.


class ReportingGrid:
  """The grid the SecAgg+ workflow talks through: every error reply is also handed to ``report`` (the workflow
  only counts failures, so a node's reason -- e.g. an update outside the clipping range -- would be lost)."""

  def __init__(self, grid: Any, report: Callable[[Message], Any]):
    self._grid, self._report = grid, report

  def __getattr__(self, name: str) -> Any:
    return getattr(self._grid, name)

  def send_and_receive(self, messages, *, timeout=None):
    replies = list(self._grid.send_and_receive(messages, timeout=timeout))
    for r in replies:
      if r.has_error():
        self._report(r)
    return replies


class _OneRound(Strategy):
  """The Strategy the SecAgg+ workflow asks for one round: our sampled nodes get the global heads, and the
  unmasked mean update is kept (the workflow hands it to ``aggregate_fit`` as every result's parameters)."""

  def __init__(self, nodes: Sequence[int], fit_ins: FitIns, grid: Any):
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    self.proxies = [GridClientProxy(n, grid, 0) for n in nodes]
    self.fit_ins = fit_ins
    self.mean: Optional[list[np.ndarray]] = None
    self.metrics: dict[int, dict[str, float]] = {}

  def configure_fit(self, server_round, parameters, client_manager):
    return [(p, self.fit_ins) for p in self.proxies]

  def aggregate_fit(self, server_round, results, failures):
    if results:
      self.mean = parameters_to_ndarrays(results[0][1].parameters)
      self.metrics = {proxy.node_id: dict(res.metrics) for proxy, res in results}
    return (results[0][1].parameters if results else None), {}

  def initialize_parameters(self, client_manager):
    return None

  def configure_evaluate(self, server_round, parameters, client_manager):
    return []

  def aggregate_evaluate(self, server_round, results, failures):
    return None, {}

  def evaluate(self, server_round, parameters):
    return None


class SecureAggregator:
  """One SecAgg+ round at a time over a grid (``FlowerTransport`` with ``secure-aggregation=true``)."""

  def __init__(self, run_config: Mapping[str, Any], weigh_by_rows: bool, max_rows: int, participants: int,
               timeout_s: Optional[float]):
    from flwr.server.workflow import SecAggPlusWorkflow
    if participants < 2:
      raise DeploymentError(f"secure aggregation needs at least 2 participants a round (SecAgg+ masks each update "
                            f"with the others'); this config samples {participants}: raise num_nodes / join_ratio "
                            "or drop secure-aggregation")
    self.clip = float(_number(run_config, "secagg-clipping-range"))
    if not self.clip > 0:
      raise DeploymentError(f"run config 'secagg-clipping-range' must be > 0, got {self.clip}")
    self.weigh_by_rows = weigh_by_rows
    try:
      self.workflow = SecAggPlusWorkflow(_number(run_config, "secagg-num-shares"),
                                         _number(run_config, "secagg-threshold"), clipping_range=self.clip,
                                         max_weight=float(max_rows if weigh_by_rows else 1), timeout=timeout_s)
    except ValueError as e:
      raise DeploymentError(f"secure aggregation settings: {e}") from None

  def round(self, grid: Any, context: Context, nodes: Sequence[int], params: Params, config: Mapping[str, Any],
            server_round: int) -> tuple[Optional[Params], dict[int, dict[str, float]]]:
    """(mean of the nodes' heads -- the global heads plus the mean update --, metrics by Flower node id) of one
    round; mean None when SecAgg+ halted (too few nodes answered to unmask)."""
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    flat = traverse_util.flatten_dict(params, sep="/")
    keys = sorted(flat)
    parameters: Parameters = ndarrays_to_parameters([np.asarray(flat[k]) for k in keys])
    fit_config = {**{k: int(v) for k, v in config.items()}, "heads-keys": json.dumps(keys),
                  "secagg-clipping-range": self.clip, "weigh-by-rows": bool(self.weigh_by_rows)}
    strategy = _OneRound(nodes, FitIns(parameters, fit_config), grid)
    legacy = LegacyContext(Context(run_id=context.run_id, node_id=context.node_id, node_config={},
                                   state=RecordDict(), run_config=dict(context.run_config)), strategy=strategy)
    legacy.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(parameters, keep_input=True)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: int(server_round)})
    self.workflow(grid, legacy)
    if strategy.mean is None:
      return None, {}
    mean = {k: (np.asarray(flat[k], np.float64) + u).astype(np.asarray(flat[k]).dtype)
            for k, u in zip(keys, strategy.mean)}
    return traverse_util.unflatten_dict(mean, sep="/"), strategy.metrics
