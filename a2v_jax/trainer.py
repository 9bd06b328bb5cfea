"""``train_and_evaluate(cfg)``: the federated run, in named stages that read top to bottom.

features -> layout -> init (or restore) -> rounds (round, evaluate, log, checkpoint) -> summary.
Each stage is a function of its own, importable and tested alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from a2v_jax import checkpoint as ckpt_lib
from a2v_jax import config as config_lib
from a2v_jax import features as features_lib
from a2v_jax.config import Config
from a2v_jax.federated import engine, sharding
from a2v_jax.federated.evaluate import make_evaluator, pad_indices
from a2v_jax.federated.local import Shared
from a2v_jax.models.heads import count_params, make_heads
from a2v_jax.run_log import RunLog


class TrainingError(RuntimeError):
  """A run that must stop (NaN loss, unusable run directory...)."""


@dataclasses.dataclass
class Prepared:
  """Everything frozen a run needs: node layout, cached features, per-class targets."""
  nodes: Any                        # a2v_jax.data.nodes.NodeData
  features: np.ndarray              # (N_all, T, D) memmap
  targets: dict[str, np.ndarray]    # {branch: (num_classes, ...)}

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.nodes.clipset.class_names


@dataclasses.dataclass
class Layout:
  """Padded index arrays: per-client training data and the evaluation sets."""
  train_idx: np.ndarray      # (C, steps*B)
  train_count: np.ndarray    # (C,)
  eval_idx: dict[str, np.ndarray]      # split -> (C, P) each node's own split
  eval_count: dict[str, np.ndarray]    # split -> (C,)
  global_idx: dict[str, np.ndarray]    # split -> (P,) union over nodes
  global_count: dict[str, int]
  steps: int
  num_real_clients: int


def prepare(cfg: Config, verbose: bool = True) -> Prepared:
  """Stage 1: node partition, cached AST features, cached text targets."""
  from a2v_jax.data.nodes import build_nodes
  nodes = build_nodes(cfg)
  if verbose:
    print(nodes.summary())
  feats = features_lib.ast_features(cfg, nodes.clipset, verbose=verbose)
  targets = features_lib.text_targets(cfg, nodes.clipset.class_names, verbose=verbose)
  features_lib.check_targets(targets, cfg, len(nodes.clipset.class_names))
  return Prepared(nodes, feats, targets)


def _stack(rows: list[np.ndarray], multiple: int) -> tuple[np.ndarray, np.ndarray]:
  width = max([len(r) for r in rows] + [1])
  width = -(-width // multiple) * multiple
  idx = np.zeros((len(rows), width), np.int32)
  count = np.zeros((len(rows),), np.int32)
  for i, r in enumerate(rows):
    idx[i, :len(r)] = r
    count[i] = len(r)
  return idx, count


def layout(cfg: Config, prepared: Prepared, num_clients: Optional[int] = None) -> Layout:
  """Stage 2: per-client padded index arrays (centralised mode pools every node into one)."""
  nodes = prepared.nodes.nodes
  bs = cfg.train.batch_size
  train = [np.asarray(n["train"], np.int32) for n in nodes]
  empty = [i for i, t in enumerate(train) if len(t) == 0]
  if empty:
    raise TrainingError(f"node(s) {empty} have no training clips; change the partition "
                        f"(partition={cfg.data.partition}, num_nodes={cfg.data.num_nodes})")
  if cfg.federation.adapter_aggregation_mode == "centralised":
    train = [np.concatenate(train)]
  real = len(train)
  c = num_clients or real
  train += [np.zeros((0,), np.int32)] * (c - real)
  train_idx, train_count = _stack(train, bs)
  eval_idx, eval_count, global_idx, global_count = {}, {}, {}, {}
  for split in ("val", "test"):
    rows = [np.asarray(n[split], np.int32) for n in nodes]
    if cfg.federation.adapter_aggregation_mode == "centralised":
      rows = [np.concatenate(rows)]
    rows += [np.zeros((0,), np.int32)] * (c - len(rows))
    eval_idx[split], eval_count[split] = _stack(rows, bs)
    allrows = np.concatenate([np.asarray(n[split], np.int32) for n in nodes])
    global_idx[split], global_count[split] = pad_indices(allrows, bs)
  steps = engine.steps_per_epoch(int(train_count.max()), bs)
  return Layout(train_idx, train_count, eval_idx, eval_count, global_idx, global_count, steps, real)


def _check_finite(metrics: dict, round_: int, num_real: int) -> None:
  for k, v in metrics.items():
    if k.endswith("_loss"):
      v = np.asarray(v)[:num_real]
      bad = np.nonzero(~np.isfinite(v))[0]
      if bad.size:
        raise TrainingError(f"non-finite {k} in round {round_} at node(s) {bad.tolist()}; "
                            "stopping (the last good checkpoint is kept)")


def run_dir_for(cfg: Config) -> Path:
  return Path(cfg.experiment.output_dir) / cfg.experiment.name


def train_and_evaluate(cfg: Config, *, resume: bool = False, verbose: bool = True,
                       prepared: Optional[Prepared] = None) -> dict[str, Any]:
  """Runs (or resumes) the federated experiment described by ``cfg``; returns the final summary."""
  run_dir = run_dir_for(cfg)
  log = RunLog(run_dir, resume=resume, verbose=verbose)
  ckpt_lib.write_json_atomic(run_dir / "config.json", cfg.to_dict())
  if verbose:
    print(f"run directory: {run_dir}")
  prepared = prepared or prepare(cfg, verbose)
  mesh = sharding.client_mesh()
  real_clients = 1 if cfg.federation.adapter_aggregation_mode == "centralised" else len(prepared.nodes.nodes)
  lay = layout(cfg, prepared, sharding.padded_clients(real_clients, mesh))
  token_shape = prepared.features.shape[1:]
  heads = make_heads(cfg, {b: t.shape[1:] for b, t in prepared.targets.items()})
  counts = count_params(heads, token_shape)
  if verbose:
    total = sum(counts.values())
    print(f"trainable parameters per node: {total:,} ({', '.join(f'{b} {n:,}' for b, n in counts.items())}); "
          f"{lay.num_real_clients} client(s), {lay.steps} local steps/epoch")
  apply_fn = lambda p, x: heads.apply({"params": p}, x.astype(jnp.float32))
  init_fn = lambda k: heads.init(k, jnp.zeros((1,) + tuple(token_shape)))["params"]
  num_clients = lay.train_idx.shape[0]
  alg = engine.fed_a2v(cfg, apply_fn, init_fn, steps=lay.steps, num_clients=num_clients)
  round_fn = engine.jit_round(alg)
  evaluate = make_evaluator(apply_fn, cfg.train.batch_size)
  eval_nodes = jax.jit(jax.vmap(evaluate, in_axes=(0, 0, 0, None)))
  eval_global = jax.jit(evaluate)
  eval_nodes_global = jax.jit(jax.vmap(evaluate, in_axes=(0, None, None, None)))

  shared = sharding.replicate(Shared(jnp.asarray(prepared.features), jnp.asarray(prepared.nodes.clipset.labels),
                                     {b: jnp.asarray(t) for b, t in prepared.targets.items()}), mesh)
  data = engine.RoundData(sharding.shard_clients(jnp.asarray(lay.train_idx), mesh),
                          sharding.shard_clients(jnp.asarray(lay.train_count), mesh))
  server, clients = alg.init(jax.random.PRNGKey(cfg.experiment.seed))
  clients = sharding.shard_clients(clients, mesh)
  server = sharding.replicate(server, mesh)
  checkpointer = ckpt_lib.RoundCheckpointer(run_dir / "state", cfg.federation.max_to_keep)
  start_round = 0
  if resume and checkpointer.latest_round() is not None:
    state, meta = checkpointer.restore(ckpt_lib.abstract({"server": server, "clients": clients}),
                                       cfg.to_dict())
    server, clients = state["server"], state["clients"]
    start_round = int(meta["round"])
    log.truncate_after(start_round)
    if verbose:
      print(f"resumed from round {start_round}")
  elif resume and verbose:
    print("nothing to resume: starting from round 0")

  mode = cfg.federation.adapter_aggregation_mode
  rounds = range(start_round + 1, cfg.federation.global_rounds + 1)
  bar = tqdm(rounds, desc="rounds", unit="round", disable=not verbose)
  round_times = []
  for r in bar:
    t0 = time.time()
    server, clients, m = round_fn(server, clients, data, shared)
    m = jax.device_get(m)
    round_times.append(time.time() - t0)
    _check_finite(m, r, lay.num_real_clients)
    row: dict[str, Any] = {"round": r, "round_seconds": round(round_times[-1], 4)}
    for k, v in m.items():
      if k.endswith("_loss"):
        for i in range(lay.num_real_clients):
          row[f"train/node_{i}/{k}"] = float(v[i])
    if cfg.federation.eval_gap and (r % cfg.federation.eval_gap == 0 or r == cfg.federation.global_rounds):
      row.update(_evaluate_round(cfg, lay, server, clients, shared, eval_nodes, eval_global,
                                 eval_nodes_global, mode))
    log.append(row)
    bar.set_postfix_str(log.short(row))
    if r % cfg.federation.checkpoint_frequency == 0 or r == cfg.federation.global_rounds:
      checkpointer.save(r, {"server": server, "clients": clients}, cfg.to_dict())
  bar.close()
  checkpointer.close()
  summary = log.finish(cfg, extra={
      "compiled_round_programs": round_fn._cache_size(),
      "mean_round_seconds_after_first": float(np.mean(round_times[1:])) if len(round_times) > 1 else None,
      "params_per_node": sum(counts.values())})
  return summary


def _evaluate_round(cfg, lay: Layout, server, clients, shared, eval_nodes, eval_global,
                    eval_nodes_global, mode: str) -> dict[str, float]:
  """Server model on the union of nodes' splits, each node on its own splits."""
  row = {}
  real = lay.num_real_clients
  for split in ("val", "test"):
    if lay.global_count[split] == 0:
      continue
    gi, gc = jnp.asarray(lay.global_idx[split]), lay.global_count[split]
    if mode == "none":  # no global model: each local model on everyone's data, averaged
      per_node = jax.device_get(eval_nodes_global(clients.params, gi, gc, shared))
      server_m = {k: float(np.mean(v[:real])) for k, v in per_node.items()}
    else:
      server_m = {k: float(v) for k, v in jax.device_get(eval_global(server.params, gi, gc, shared)).items()}
    for k, v in server_m.items():
      row[f"test/server/{k}_on_{split}"] = v
    node_m = jax.device_get(eval_nodes(clients.params, jnp.asarray(lay.eval_idx[split]),
                                       jnp.asarray(lay.eval_count[split]), shared))
    for k, v in node_m.items():
      for i in range(real):
        if lay.eval_count[split][i] > 0:
          row[f"test/node_{i}/{k}_on_{split}"] = float(v[i])
  return row
