"""``train_and_evaluate(cfg)``: the federated run, in named stages that read top to bottom.

features -> layout -> init (or restore) -> rounds (round, evaluate, log, checkpoint) -> summary.
Each stage is a function of its own, importable and tested alone.

Generator runs (``generators/runs.py``) add stages without changing the engine:
Run 1 (``use_generator``) trains the generators after each round's heads and checkpoints them with the
heads (``generator_only_mode`` runs generator rounds only); Run 2 (``use_pretrained_generators``)
restores them first (start-up errors before anything else), prepares without the AST and appends
synthetic train rows to the features. ``adapter_aggregation_mode: kd`` distils the server heads after
each round (``federated/kd.py``).

Across processes only the heads' arrays are global (clients split over processes, server replicated).
The generator stages are replicated instead: they are small (one generator per node / class slot), so
every process computes them whole on its own devices, from the same features and keys, as
process-local arrays; their outputs (synthetic rows, KD features) are the same on every process and
enter the global arrays through ``Placement`` like everything else. Process 0 alone writes generator
checkpoints (``generator_checkpoint``); every process reads them.
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

from a2v_jax.errors import A2VError
from a2v_jax import checkpoint as ckpt_lib
from a2v_jax import config as config_lib
from a2v_jax import features as features_lib
from a2v_jax.config import Config
from a2v_jax.generators import checkpoint as gen_ckpt
from a2v_jax.federated import distributed, engine, sharding
from a2v_jax.generators import runs as generator_runs
from a2v_jax.federated import kd as kd_lib
from a2v_jax.federated import server_train
from a2v_jax.federated.evaluate import make_evaluator, pad_indices
from a2v_jax.federated.evaluate import predict as predict_rows
from a2v_jax.render.round_outputs import RoundOutputs
from a2v_jax.federated.local import Shared
from a2v_jax.models.heads import count_params, head_functions, make_heads
from a2v_jax.run.log import RunLog
from a2v_jax.run import wandb_sink


class TrainingError(A2VError, RuntimeError):
  """A run that must stop (NaN loss, unusable run directory...)."""


@dataclasses.dataclass
class Prepared:
  """Everything frozen a run needs: node layout, cached features, per-class targets."""
  nodes: Any                        # a2v_jax.data.nodes.NodeData
  features: Optional[np.ndarray]    # (N_all, T, D) memmap; None only in Run 2 without a feature cache
  targets: dict[str, np.ndarray]    # {branch: (num_classes, ...)}; empty in generator_only_mode

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


def prepare(cfg: Config, verbose: bool = True, *, nodes: Any = None,
            feature_cache_hint: Optional[str] = None) -> Prepared:
  """Stage 1: node partition, cached AST features, cached text targets.

  Run 2 (``use_pretrained_generators``) never constructs the AST: features come from the cache when
  one exists for these clips (``feature_cache_hint``: the cache Run 1 recorded), else they are None
  and Run 2 trains on synthetic features only. ``generator_only_mode`` trains no heads and so computes
  no text targets (no text encoder is loaded).
  """
  from a2v_jax.data.nodes import build_nodes
  nodes = nodes if nodes is not None else build_nodes(cfg)
  if verbose:
    print(nodes.summary())
  g = cfg.generators
  if g.use_pretrained_generators:
    feats = generator_runs.cached_features(cfg, nodes.clipset, hint=feature_cache_hint, verbose=verbose)
    if feats is None and verbose:
      print("AST features: no cache for these clips; Run 2 trains on synthetic features only and real "
            "evaluation is unavailable (the AST is not run in Run 2)")
  else:
    feats = features_lib.ast_features(cfg, nodes.clipset, verbose=verbose)
  if g.generator_only_mode and not generator_runs.text_conditioned(cfg):
    return Prepared(nodes, feats, {})  # (a text-conditioned generator needs the text targets)
  targets = features_lib.text_targets(cfg, nodes.clipset.class_names, verbose=verbose)
  features_lib.check_targets(targets, cfg, len(nodes.clipset.class_names))
  return Prepared(nodes, feats, targets)


@dataclasses.dataclass
class PretrainedGenerators:
  """Run 2's restored generators and what was drawn from them."""
  state: Any                           # generator_training.GenState
  scale: generator_runs.FeatureScale   # what the generators' samples are standardised by
  round: int
  rows: generator_runs.SyntheticRows   # where the synthetic (and class-mean) rows are, the server's counts
  counts: np.ndarray                   # (C, K) synthetic rows per node and class
  length: int                          # tokens per synthetic row

  @property
  def server_row(self) -> dict[str, int]:
    return self.rows.server_row


def start_pretrained(cfg: Config, prepared: Optional[Prepared], verbose: bool = True
                     ) -> tuple[Prepared, PretrainedGenerators]:
  """Run 2's start-up: restore the generators (every checkpoint problem is raised here, before any
  feature, target or training work), prepare without the AST, append the synthetic train rows."""
  from a2v_jax.data.nodes import build_nodes
  nodes = prepared.nodes if prepared is not None else build_nodes(cfg)
  fdim = None if prepared is None or prepared.features is None else prepared.features.shape[-1]
  state, rnd, extra = generator_runs.restore_pretrained(cfg, nodes, feature_dim=fdim)
  if verbose:
    print(f"Run 2: generators of round {rnd} restored from {gen_ckpt.round_dir(cfg.generators, rnd)} "
          f"({state.layout.num_slots} slot(s)); the AST is not used")
  prepared = prepared or prepare_in_turn(cfg, verbose, nodes=nodes, feature_cache_hint=extra.get("feature_cache"))
  generator_runs.check_condition(cfg, state, prepared.targets, str(gen_ckpt.round_dir(cfg.generators, rnd)))
  scale = generator_runs.FeatureScale.from_extra(extra, state.spec)
  length = generator_runs.check_features(cfg, state, prepared.features)
  counts = generator_runs.synthetic_counts(cfg, prepared.nodes)
  prepared, rows = generator_runs.add_synthetic(cfg, prepared, state, scale, length, verbose=verbose)
  return prepared, PretrainedGenerators(state, scale, rnd, rows, counts, length)


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


# Compiler options of run-once programs: LLVM's optimisation of the many small random ops of an init
# costs ~5x more CPU time than it saves (they run once).
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def init_state(alg: engine.Algorithm, key: jax.Array) -> tuple[Any, Any]:
  """``alg.init`` as one cheaply compiled program.

  Why: run eagerly, every initialiser op of every client compiles on its own (~300 programs, tens of
  seconds on 2 CPU cores); jitted with default options, the vmapped init compiles for about as long.
  The values differ from the eager init only in float rounding (ulps).
  """
  return jax.jit(alg.init).lower(key).compile(compiler_options=RUN_ONCE_COMPILER_OPTIONS)(key)


def run_dir_for(cfg: Config) -> Path:
  return Path(cfg.experiment.output_dir) / cfg.experiment.name


# How long the other processes of a multi-process run wait for process 0 to fill the feature caches.
PREPARE_TIMEOUT_S = 6 * 3600


def prepare_in_turn(cfg: Config, verbose: bool = True, **kwargs: Any) -> Prepared:
  """``prepare`` (with ``kwargs``) on every process, process 0 first.

  Why in turn: processes that fill one feature or target cache (or write the tiny backbones) at the
  same time race on its final rename. Process 0 fills the caches while the others wait at a barrier;
  they then read them (on a filesystem the processes share; otherwise each host prepares its own).
  """
  if jax.process_count() == 1:
    return prepare(cfg, verbose, **kwargs)
  prepared = prepare(cfg, verbose, **kwargs) if jax.process_index() == 0 else None
  distributed.barrier("a2v_prepare", PREPARE_TIMEOUT_S)
  return prepared if prepared is not None else prepare(cfg, verbose=False, **kwargs)


def train_and_evaluate(cfg: Config, *, resume: bool = False, verbose: bool = True,
                       prepared: Optional[Prepared] = None) -> dict[str, Any]:
  """Runs (or resumes) the federated experiment described by ``cfg``; returns the final summary.

  Across processes (after ``distributed.initialize``) every process calls this with the same config:
  each feeds the clients its devices hold, all take part in the rounds, evaluations and orbax's
  checkpoint saves and restores, and process 0 alone writes the run directory and prints. Generator
  stages and KD run replicated (module docstring).
  """
  if cfg.federation.adapter_load_checkpoint is not None:  # generate: trained heads + generators, no training
    from a2v_jax.run import generate
    return generate.run_generate(cfg, resume=resume, verbose=verbose, prepared=prepared)
  run_dir = run_dir_for(cfg)
  g = cfg.generators
  primary = jax.process_index() == 0
  verbose = verbose and primary
  pretrained = None
  if g.use_pretrained_generators:  # Run 2: checkpoint problems surface before the run directory is touched
    prepared, pretrained = start_pretrained(cfg, prepared, verbose)
  log = RunLog(run_dir, resume=resume, verbose=verbose, write=primary)
  # wandb mirrors heads runs (generator-only runs log to the run directory only).
  sink = None if g.generator_only_mode or not primary else wandb_sink.open_sink(cfg, run_dir, resume=resume)
  if primary:
    ckpt_lib.write_json_atomic(run_dir / "config.json", cfg.to_dict())
  if verbose:
    print(f"run directory: {run_dir}")
  prepared = prepared or prepare_in_turn(cfg, verbose)
  if g.generator_only_mode:
    return generator_runs.train_generators_only(cfg, prepared, log, resume=resume, verbose=verbose)
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
  apply_fn, init_fn = head_functions(heads, token_shape)
  num_clients = lay.train_idx.shape[0]
  place = distributed.Placement(mesh, num_clients)
  alg = engine.fed_a2v(cfg, apply_fn, init_fn, steps=lay.steps, num_clients=num_clients)
  round_fn = engine.jit_round(alg)
  evaluate = make_evaluator(apply_fn, cfg.train.batch_size)
  eval_nodes = jax.jit(jax.vmap(evaluate, in_axes=(0, 0, 0, None)))
  eval_global = jax.jit(evaluate)
  eval_nodes_global = jax.jit(jax.vmap(evaluate, in_axes=(0, None, None, None)))

  host_shared = Shared(prepared.features, prepared.nodes.clipset.labels, dict(prepared.targets))
  shared = place.replicated(host_shared)
  data = engine.RoundData(*place.clients((lay.train_idx, lay.train_count)))
  # Every process computes the whole init on its own devices (the same values) and keeps its clients.
  server, clients = init_state(alg, jax.random.PRNGKey(cfg.experiment.seed))
  clients = place.clients(clients)
  server = place.replicated(server)
  checkpointer = ckpt_lib.RoundCheckpointer(run_dir / "state", cfg.federation.max_to_keep)
  # Embedding checkpoints and in-training renders (render/round_outputs.py); `shared` is an argument so the
  # features are not baked into the program as a constant.
  outputs = RoundOutputs(cfg, run_dir, prepared.class_names,
                         [c.clip_id for c in prepared.nodes.clipset.clips], cfg.hash())
  predict_jit = jax.jit(lambda p, idx, sh: predict_rows(apply_fn, p, idx, sh, cfg.train.batch_size))
  start_round = 0
  if resume and checkpointer.latest_round() is not None:
    state, meta = checkpointer.restore(ckpt_lib.abstract({"server": server, "clients": clients}),
                                       cfg.to_dict())
    server, clients = state["server"], state["clients"]
    start_round = int(meta["round"])
    log.truncate_after(start_round)
    if verbose:
      print(f"resumed from round {start_round}")
  elif resume:  # killed before its first checkpoint: the rows it logged are recomputed, not kept twice
    log.truncate_after(0)
    if verbose:
      print("nothing to resume: starting from round 0")

  # Run 1: generators train after each round's heads; they are checkpointed together with the heads
  # (at multiples of either frequency), so a resume restores both from the same round.
  run1 = None
  if g.use_generator and g.generator_training_mode and not g.use_pretrained_generators:
    run1 = generator_runs.start_run1(cfg, prepared, resume_round=start_round or None, resume=resume)
    run1_extra = generator_runs.run1_extra(cfg, prepared, run1)
  mode = cfg.federation.adapter_aggregation_mode
  kd = kd_lib.make_kd(cfg, apply_fn, cfg.train.batch_size) if mode == "kd" else None
  kd_weights = np.asarray(lay.train_count > 0, np.float32)  # teacher: every real client, uniform

  # Run 2 with global_model_train: after FedAvg the server trains the global heads on the aggregated
  # synthetic rows (+ the nodes' per-class mean features), federated/server_train.py.
  server_step = aggregate = None
  if pretrained is not None:
    srows = pretrained.rows
    indices = srows.server_indices()
    aggregate = server_train.make_aggregate(
        indices, srows.nodes, prepared.nodes.clipset.labels[indices], np.arange(len(indices)) < srows.count,
        len(prepared.class_names), cfg.train.batch_size)
    if cfg.federation.global_model_train:
      server_step = _make_server_step(cfg, apply_fn, srows.count + srows.mean_count, place)

  # Run 2: fresh synthetic rows before every round after the first (rows and labels keep their places).
  redraw = pretrained is not None and g.synthetic_resample_each_round
  host_features = np.array(prepared.features) if redraw else None

  last = cfg.federation.global_rounds
  rounds = range(start_round + 1, last + 1)
  bar = tqdm(rounds, desc="rounds", unit="round", disable=not verbose)
  round_times = []
  for r in bar:
    t0 = time.time()
    if redraw and r > 1:
      host_features[pretrained.rows.offset:] = generator_runs.redraw_synthetic(
          cfg, pretrained.state, pretrained.scale, pretrained.counts, pretrained.length, r)
      shared = place.replicated(shared._replace(features=host_features))
    server, clients, m = round_fn(server, clients, data, shared)
    m = place.host(m)
    _check_finite(m, r, lay.num_real_clients)
    extra_row: dict[str, Any] = {}
    if run1 is not None:
      run1, grow = generator_runs.train_round(cfg, run1, r)
      extra_row.update(grow)
    if aggregate is not None:  # the server gathers what this round's participants sent, per class
      agg_idx, agg_count, per_class = aggregate(m["participate"])
      per_class = np.asarray(per_class)
      extra_row.update({"server/synthetic_samples_total": int(per_class.sum()),
                        "server/synthetic_samples_classes": int((per_class > 0).sum())})
    if server_step is not None:
      server, srow = server_step(server, clients, data, m["participate"], agg_idx, agg_count, shared, r)
      extra_row.update(srow)
    if kd is not None:
      gens = (run1.state, run1.scale) if run1 is not None else (pretrained.state, pretrained.scale)
      server, krow = kd_round(cfg, kd, server, clients, gens, kd_weights, int(token_shape[0]), r, place)
      server = place.replicated(server)
      extra_row.update(krow)
    round_times.append(time.time() - t0)
    row: dict[str, Any] = {"round": r, "round_seconds": round(round_times[-1], 4)}
    for k, v in m.items():
      if k.endswith("_loss"):
        for i in range(lay.num_real_clients):
          row[f"train/node_{i}/{k}"] = float(v[i])
    row.update(extra_row)
    if cfg.federation.eval_gap and (r % cfg.federation.eval_gap == 0 or r == last):
      row.update(_evaluate_round(cfg, lay, server, clients, shared, eval_nodes, eval_global,
                                 eval_nodes_global, mode, place))
    if outputs.wants(r):
      out_server, out_clients, out_shared = server.params, clients.params, shared
      if place.multi:  # every process gathers (a collective); process 0 predicts on its own devices
        out_server, out_clients = place.host((server.params, clients.params))
        out_shared = jax.tree.map(jnp.asarray, host_shared) if primary else None
      if primary:
        row.update(outputs(r, predict_fn=lambda p, idx: predict_jit(p, idx, out_shared),
                           server_params=out_server, client_params=out_clients,
                           node_splits=prepared.nodes.nodes, labels=prepared.nodes.clipset.labels))
    log.append(row)
    if sink is not None:
      sink.log(row)
    bar.set_postfix_str(log.short(row))
    save = r % cfg.federation.checkpoint_frequency == 0 or r == last
    if run1 is not None:
      save = save or gen_ckpt.should_save(g, r, last)
      if save and g.generator_save_checkpoint:  # generators first: a heads round implies its generators
        gen_ckpt.save_generators(g, run1.state, r, extra=run1_extra)
    if save:
      checkpointer.save(r, {"server": server, "clients": clients}, cfg.to_dict())
  bar.close()
  checkpointer.close()
  extra: dict[str, Any] = {
      "compiled_round_programs": round_fn._cache_size(),
      "mean_round_seconds_after_first": float(np.mean(round_times[1:])) if len(round_times) > 1 else None,
      "params_per_node": sum(counts.values())}
  if run1 is not None:
    extra["generator_checkpoints"] = str(gen_ckpt.checkpoint_root(g))
  if place.multi:
    extra["processes"] = jax.process_count()
  if pretrained is not None:
    extra.update(generator_round=pretrained.round, real_evaluation=lay.global_count["test"] > 0,
                 **{k.split("/")[-1]: v for k, v in pretrained.server_row.items()})
    if verbose and lay.global_count["test"] == 0:
      print("no real features: nothing to evaluate on (Run 2 trained on synthetic features only)")
  summary = log.finish(cfg, extra=extra)
  if sink is not None:
    sink.finish(summary)
  return summary


def _make_server_step(cfg: Config, apply_fn, max_rows: int, place: distributed.Placement):
  """``step(server, clients, data, participate, idx, count, shared, round) -> (server, row)``: Run 2's
  server global training on the rows ``server_train.make_aggregate`` gathered from the round's participants
  (``idx``, the first ``count`` valid; one compiled program whatever the sample)."""
  train = server_train.make_server_train(cfg, apply_fn, max_rows)
  node_targets = (server_train.make_node_targets(apply_fn, cfg.train.batch_size)
                  if cfg.federation.global_model_train_from_nodes_adapters else None)

  def step(server, clients, data: engine.RoundData, participate, idx, count, shared: Shared, round_: int):
    t0 = time.time()
    table = shared.targets if node_targets is None else node_targets(
        clients.params, data.idx, data.count * jnp.asarray(participate, data.count.dtype), shared)
    key = place.inputs(server_train.server_key(cfg, round_), clients=False)
    idx, count = place.inputs(idx, clients=False), int(count)  # idx stays on the device in one process
    params, metrics = train(server.params, idx, count, shared._replace(targets=table), key)
    metrics = _finite(place.host(metrics), "the server's global training", round_)
    row = {f"server/global_train_{k}": float(v) for k, v in metrics.items()}
    row["server/global_train_samples"] = int(count)
    row["server/global_train_seconds"] = round(time.time() - t0, 4)
    return place.replicated(server.replace(params=params)), row

  return step


def _finite(metrics: dict[str, Any], stage: str, round_: int) -> dict[str, Any]:
  """``metrics`` if every value is finite; else the run stops (its last good checkpoint is kept)."""
  for k, v in metrics.items():
    if not np.all(np.isfinite(v)):
      raise TrainingError(f"non-finite {k} in {stage} of round {round_}; stopping (the last good checkpoint is "
                          "kept)")
  return metrics


def kd_round(cfg: Config, kd: kd_lib.KD, server, clients, gens: tuple[Any, Any], weights: np.ndarray,
             length: int, round_: int, place: distributed.Placement) -> tuple[Any, dict[str, float]]:
  """KD stage of a round: fresh per-class generator features, teachers once, distil the server heads.

  ``gens`` = (generator state, its FeatureScale), the same on every process: the KD features are drawn
  on each process's own devices and enter the heads' programs as replicated inputs (``place``).
  """
  key = jax.random.fold_in(generator_runs.run_key(cfg, generator_runs.KD_SALT), round_)
  x, mask = generator_runs.kd_features(*gens, key, cfg.federation.kd_samples_per_class, length,
                                       cfg.train.batch_size)
  samples = int(np.asarray(mask).sum())
  x, mask, weights, dkey = place.inputs((x, mask, weights, jax.random.fold_in(key, 1)), clients=False)
  teacher = kd.teacher(clients.params, weights, x)
  params, metrics = kd.distill(server.params, x, mask, teacher, dkey)
  metrics = _finite(place.host(metrics), "the KD stage", round_)
  row = {}
  for k, v in metrics.items():
    if k.endswith("_epoch_loss"):  # first and last epoch of the batch losses
      row[f"server/{k[:-len('_epoch_loss')]}_first_epoch_loss"] = float(v[0])
      row[f"server/{k[:-len('_epoch_loss')]}_last_epoch_loss"] = float(v[-1])
    else:
      row[f"server/{k}"] = float(v)
  row["server/kd_samples"] = samples
  return server.replace(params=params), row


def _evaluate_round(cfg, lay: Layout, server, clients, shared, eval_nodes, eval_global,
                    eval_nodes_global, mode: str, place: distributed.Placement) -> dict[str, float]:
  """Server model on the union of nodes' splits, each node on its own splits."""
  row = {}
  real = lay.num_real_clients
  for split in ("val", "test"):
    if lay.global_count[split] == 0:
      continue
    gi, gc = place.inputs(lay.global_idx[split], clients=False), lay.global_count[split]
    if mode == "none":  # no global model: each local model on everyone's data, averaged
      per_node = place.host(eval_nodes_global(clients.params, gi, gc, shared))
      server_m = {k: float(np.mean(v[:real])) for k, v in per_node.items()}
    else:
      server_m = {k: float(v) for k, v in place.host(eval_global(server.params, gi, gc, shared)).items()}
    for k, v in server_m.items():
      row[f"test/server/{k}_on_{split}"] = v
    node_m = place.host(eval_nodes(clients.params, place.inputs(lay.eval_idx[split], clients=True),
                                   place.inputs(lay.eval_count[split], clients=True), shared))
    for k, v in node_m.items():
      for i in range(real):
        if lay.eval_count[split][i] > 0:
          row[f"test/node_{i}/{k}_on_{split}"] = float(v[i])
  return row
