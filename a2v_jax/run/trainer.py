"""``train_and_evaluate(cfg)``: the federated run, in named stages that read top to bottom.

Set-up: ``prepare`` (nodes, cached features, text targets) -> ``layout`` (padded index arrays) -> the heads'
programs -> ``init_state`` or ``restore_heads``. Then the one round loop (``run/rounds.py``) over this
run's stages, each ``stage(carry, round) -> (carry, row entries)`` on a :class:`Carry`:

  redraw_stage    Run 2 with ``synthetic_resample_each_round``: fresh synthetic rows (rounds after the first)
  share_stage     Run 2 with ``server_synthetic_samples_per_class``: the participants' rows plus the synthetic
                  rows of the classes each lacks, drawn from the other participants (``federated/synthetic_share.py``)
  heads_stage     local training of the sampled clients + aggregation (``federated/engine.py``)
  run1_stage      Run 1 (``use_generator``): the generators train after the round's heads
  server_stage    Run 2: the server gathers the participants' synthetic rows, trains the global heads on them
  kd_stage        ``adapter_aggregation_mode: kd``: distil the server heads (``federated/kd.py``)
  evaluate_stage, outputs_stage   (not timed) val / test metrics; embeddings and renders
  heads_saver     round checkpoints (Run 1's generators first)

``generator_only_mode`` runs go through the same loop with one stage (:func:`generators_only`).
A config with ``adapter_load_checkpoint`` is not trained: ``run/experiment.py`` sends it to ``generate``.

Across processes only the heads' arrays are global (clients split over processes, server replicated).
The generator stages are replicated instead: they are small (one generator per node / class slot), so
every process computes them whole on its own devices, from the same features and keys, as
process-local arrays; their outputs (synthetic rows, KD features) are the same on every process and
enter the global arrays through ``Placement`` like everything else. Process 0 alone writes generator
checkpoints (``generator_checkpoint``); every process reads them.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.errors import A2VError
from a2v_jax import checkpoint as ckpt_lib
from a2v_jax import features as features_lib
from a2v_jax.config import Config
from a2v_jax.generators import checkpoint as gen_ckpt
from a2v_jax.federated import privacy, distributed, engine, sharding
from a2v_jax.generators import runs as generator_runs
from a2v_jax.federated import kd as kd_lib
from a2v_jax.federated import server_train, synthetic_share
from a2v_jax.federated.evaluate import make_evaluator, pad_indices
from a2v_jax.federated.evaluate import predict as predict_rows
from a2v_jax.render.round_outputs import RoundOutputs
from a2v_jax.federated.local import Shared
from a2v_jax.models.heads import count_params, head_functions, make_heads
from a2v_jax.run.log import RunLog, run_dir_for
from a2v_jax.run.rounds import Rounds, mean_after_first, run_rounds
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
  dp: Optional[dict] = None            # the generators' DP guarantee (their checkpoint's), None without DP

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
  dp = generator_runs.report_guarantee(cfg, extra, f"round {rnd}", print if verbose else (lambda _: None))
  prepared = prepared or prepare_in_turn(cfg, verbose, nodes=nodes, feature_cache_hint=extra.get("feature_cache"))
  generator_runs.check_condition(cfg, state, prepared.targets, str(gen_ckpt.round_dir(cfg.generators, rnd)))
  scale = generator_runs.FeatureScale.from_extra(extra, state.spec)
  length = generator_runs.check_features(cfg, state, prepared.features)
  counts = generator_runs.synthetic_counts(cfg, prepared.nodes)
  prepared, rows = generator_runs.add_synthetic(cfg, prepared, state, scale, length, verbose=verbose)
  return prepared, PretrainedGenerators(state, scale, rnd, rows, counts, length, dp)


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


@dataclasses.dataclass(frozen=True)
class Carry:
  """A heads run's state between stages of a round."""
  server: Any                 # the global heads (replicated)
  clients: Any                # every client's heads (split over the mesh)
  shared: Shared              # features, labels, targets (replaced when Run 2 redraws its synthetic rows)
  participate: Any = None     # this round's sampled clients (set by the heads stage)
  data: Any = None            # this round's training rows when the share stage sets them (else the layout's)
  run1: Any = None            # Run 1's generators (generators.runs.Run1), trained after the heads


def train_and_evaluate(cfg: Config, *, resume: bool = False, verbose: bool = True,
                       prepared: Optional[Prepared] = None) -> dict[str, Any]:
  """Runs (or resumes) the federated experiment described by ``cfg``; returns the final summary.

  Stages: Run 2 start-up (its checkpoint problems surface before the run directory is touched) -> run
  directory -> features -> (generator-only runs: :func:`generators_only`) -> layout and programs ->
  init or restore -> :func:`a2v_jax.run.rounds.run_rounds` over this run's stages -> summary.

  Across processes (after ``distributed.initialize``) every process calls this with the same config:
  each feeds the clients its devices hold, all take part in the rounds, evaluations and orbax's
  checkpoint saves and restores, and process 0 alone writes the run directory and prints. Generator
  stages and KD run replicated (module docstring).
  """
  if cfg.federation.adapter_load_checkpoint is not None:
    raise TrainingError("adapter_load_checkpoint is set: this is a generate run (no training); run it through "
                        "a2v_jax.run.experiment.run_experiment or python -m experiments.run")
  run_dir = run_dir_for(cfg)
  g = cfg.generators
  primary = jax.process_index() == 0
  verbose = verbose and primary
  pretrained = None
  if g.use_pretrained_generators:
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
    return generators_only(cfg, prepared, log, resume=resume, verbose=verbose)

  mesh = sharding.client_mesh()
  real_clients = 1 if cfg.federation.adapter_aggregation_mode == "centralised" else len(prepared.nodes.nodes)
  lay = layout(cfg, prepared, sharding.padded_clients(real_clients, mesh))
  share = start_share(cfg, prepared, pretrained, lay, verbose) if pretrained is not None else None
  if share is not None:
    lay = dataclasses.replace(lay, steps=share.steps)
  accountant = None
  if cfg.privacy.dp_level is not None:
    cfg, accountant = start_privacy(cfg, lay, verbose, pretrained.dp if pretrained is not None else None)
  elif pretrained is not None and verbose:
    inherited = generator_runs.inherited_guarantee(cfg, pretrained.dp)
    if inherited is not None:
      print(f"DP: the heads train on the generators' synthetic features only (post-processing): this run's "
            f"guarantee is theirs, epsilon up to {inherited['epsilon_max']:.3g} at delta {inherited['delta']:.3g}")
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
  host_shared = Shared(prepared.features, prepared.nodes.clipset.labels, dict(prepared.targets))
  data = engine.RoundData(*place.clients((lay.train_idx, lay.train_count)))
  # Every process computes the whole init on its own devices (the same values) and keeps its clients.
  server, clients = init_state(alg, jax.random.PRNGKey(cfg.experiment.seed))
  carry = Carry(place.replicated(server), place.clients(clients), place.replicated(host_shared))
  checkpointer = ckpt_lib.RoundCheckpointer(run_dir / "state", cfg.federation.max_to_keep)
  start_round, restored = restore_heads(checkpointer, carry, cfg, log, verbose) if resume else (0, None)
  if restored is not None:
    carry = dataclasses.replace(carry, **restored)
  if g.use_generator and g.generator_training_mode and not g.use_pretrained_generators:
    carry = dataclasses.replace(
        carry, run1=generator_runs.start_run1(cfg, prepared, resume_round=start_round or None, resume=resume))

  train = []
  if pretrained is not None and g.synthetic_resample_each_round:
    train.append(redraw_stage(cfg, pretrained, prepared, place))
  if share is not None:
    train.append(share_stage(cfg, share, place))
  train.append(heads_stage(round_fn, data, place, lay.num_real_clients))
  if accountant is not None:
    if start_round:
      accountant.restore(log.rows[-1] if log.rows else {})
    train.append(privacy_stage(accountant))
  if carry.run1 is not None:
    train.append(run1_stage(cfg))
  if pretrained is not None:
    train.append(server_stage(cfg, apply_fn, pretrained, prepared, data, place))
  if cfg.federation.adapter_aggregation_mode == "kd":
    kd = kd_lib.make_kd(cfg, apply_fn, cfg.train.batch_size)
    gens = None if carry.run1 is not None else (pretrained.state, pretrained.scale)
    train.append(kd_stage(cfg, kd, gens, np.asarray(lay.train_count > 0, np.float32), int(token_shape[0]), place))
  report = [evaluate_stage(cfg, lay, apply_fn, place)]
  outputs = RoundOutputs(cfg, run_dir, prepared.class_names,
                         [c.clip_id for c in prepared.nodes.clipset.clips], cfg.hash())
  report.append(outputs_stage(cfg, outputs, apply_fn, prepared, host_shared, place))
  run1_extra = generator_runs.run1_extra(cfg, prepared, carry.run1) if carry.run1 is not None else None
  try:
    carry, times = run_rounds(carry, Rounds(train, report, heads_saver(cfg, checkpointer, run1_extra)),
                              start=start_round, last=cfg.federation.global_rounds, log=log, sink=sink,
                              verbose=verbose)
  finally:
    checkpointer.close()
  extra: dict[str, Any] = {"compiled_round_programs": round_fn._cache_size(),
                           "mean_round_seconds_after_first": mean_after_first(times),
                           "params_per_node": sum(counts.values())}
  if accountant is not None:
    extra["dp"] = accountant.summary(cfg)
  elif pretrained is not None and generator_runs.inherited_guarantee(cfg, pretrained.dp) is not None:
    extra["dp"] = generator_runs.inherited_guarantee(cfg, pretrained.dp)
  if carry.run1 is not None:
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


def restore_heads(checkpointer: ckpt_lib.RoundCheckpointer, carry: Carry, cfg: Config, log: RunLog,
                  verbose: bool) -> tuple[int, Optional[dict[str, Any]]]:
  """``--resume``: the round and ``{server, clients}`` of the newest intact checkpoint (a damaged newer round is
  moved aside with a warning: ``RoundCheckpointer.restore_intact``), or (0, None) when there is none (a run
  killed before its first checkpoint: the rows it logged are recomputed, not kept twice)."""
  if checkpointer.latest_round() is None:
    log.truncate_after(0)
    if verbose:
      print("nothing to resume: starting from round 0")
    return 0, None
  say = lambda m: print(f"warning: {m}", file=sys.stderr, flush=True) if jax.process_index() == 0 else None
  got = checkpointer.restore_intact(ckpt_lib.abstract({"server": carry.server, "clients": carry.clients}),
                                    cfg.to_dict(), say)
  if got is None:
    log.truncate_after(0)
    return 0, None
  state, meta = got
  start = int(meta["round"])
  log.truncate_after(start)
  if verbose:
    print(f"resumed from round {start}")
  return start, state


# ---------------------------------------------------------------------------------------------
# The stages of a heads run, each ``stage(carry, round) -> (carry, row entries)`` (run/rounds.py).


def heads_stage(round_fn, data: engine.RoundData, place: distributed.Placement, num_real: int):
  """The heads' round: local training of the sampled clients and aggregation (one jitted program)."""
  def stage(carry: Carry, r: int):
    server, clients, m = round_fn(carry.server, carry.clients, data if carry.data is None else carry.data,
                                 carry.shared)
    m = place.host(m)
    _check_finite(m, r, num_real)
    row = {f"train/node_{i}/{k}": float(v[i]) for k, v in m.items() if k.endswith("_loss") for i in range(num_real)}
    return dataclasses.replace(carry, server=server, clients=clients, participate=m["participate"]), row
  return stage


def _noise(cfg: Config, rates: list[float], steps: list[int], delta: float, verbose: bool,
           worst: Optional[Any] = None, composed: bool = False) -> tuple[Config, float]:
  """The noise multiplier (calibrated to ``dp_target_epsilon`` for ``steps`` when that is given, and printed), and
  the config the programs are built from (with that multiplier). ``worst``: ``privacy.calibrate``'s, when a node's
  epsilon is more than its own steps' (``composed``: with its generators' DP-SGD)."""
  p = cfg.privacy
  sigma = p.dp_noise_multiplier
  if sigma is None:
    sigma = privacy.calibrate(p.dp_target_epsilon, rates, steps, delta, worst)
    if verbose:
      print(f"DP: noise multiplier {sigma:.4f} calibrated for epsilon {p.dp_target_epsilon} at delta {delta:.3g} "
            f"after {cfg.federation.global_rounds} rounds (every node sampled every round"
            + (", composed with the generators' DP-SGD)" if composed else ")"))
  privacy_cfg = dataclasses.replace(p, dp_noise_multiplier=float(sigma), dp_target_epsilon=None)
  return dataclasses.replace(cfg, privacy=privacy_cfg), float(sigma)


def start_privacy(cfg: Config, lay: Layout, verbose: bool, generators_dp: Optional[dict] = None
                  ) -> tuple[Config, Any]:
  """The run's DP accountant and the config with its noise multiplier. Record level: each node's sampling rate
  (batch / its rows) and DP steps per round; node level: the client sampling rate m / C, one release per round.
  ``generators_dp``: Run 2's generators' guarantee (a DP Run 1's), composed into each node's epsilon (required).

  Raises:
    privacy.PrivacyError: Run 2 with DP heads on generators trained without DP.
  """
  if cfg.generators.use_pretrained_generators and generators_dp is None:
    raise privacy.PrivacyError("config key 'dp_level' in Run 2 composes the heads' DP-SGD with the generators' "
                               "guarantee, but the restored generators were trained without DP: train them with "
                               "'dp_level': 'record' in a generator-only Run 1")
  p, b, rounds = cfg.privacy, cfg.train.batch_size, cfg.federation.global_rounds
  n = np.asarray(lay.train_count[:lay.num_real_clients], np.int64)
  if p.dp_level == "node":
    rate = engine.num_participants(cfg, lay.train_idx.shape[0]) / len(n)
    delta = privacy.dp_delta(p.dp_delta, len(n))
    cfg, sigma = _noise(cfg, [rate], [rounds], delta, verbose)
    if verbose:
      print(f"DP (node level): clip {p.dp_l2_clip}{' (adaptive)' if p.dp_adaptive_clip else ''}, noise multiplier "
            f"{sigma:.4f}, delta {delta:.3g}, client sampling rate {rate:.4g}")
    return cfg, privacy.NodeAccountant(rate, sigma, delta)
  rates = np.minimum(1.0, b / np.maximum(n, 1))
  steps = cfg.train.local_epochs * np.ceil(n / b).astype(np.int64) * (n > 0)
  delta = privacy.dp_delta(p.dp_delta, int(n[n > 0].min()) if (n > 0).any() else 1)
  prior = privacy.GeneratorAccountant.groups(generators_dp) if generators_dp is not None else None
  probe = privacy.RecordAccountant(rates, steps, 1.0, delta, prior)
  worst = lambda z, accountant="pld": max(probe.node_epsilon(i, s * rounds, z, accountant)
                                         for i, s in enumerate(steps))
  cfg, sigma = _noise(cfg, list(rates), list(steps * rounds), delta, verbose, worst, composed=bool(prior))
  if verbose:
    print(f"DP (record level): clip {p.dp_l2_clip}, noise multiplier {sigma:.4f}, delta {delta:.3g}; node sampling "
          f"rates {np.round(rates, 4).tolist()}, DP steps per round {steps.tolist()}"
          + ("; each node's epsilon includes its generators' (Run 1)" if prior else ""))
  return cfg, privacy.RecordAccountant(rates, steps, sigma, delta, prior)


def privacy_stage(accountant: Any):
  """After the heads' round: every sampled node spent its round's DP steps; the row states each epsilon."""
  def stage(carry: Carry, r: int):
    accountant.record(np.asarray(carry.participate))
    row = accountant.row()
    if carry.server.clip is not None:
      row["privacy/clip"] = float(jax.device_get(carry.server.clip))
    return carry, row
  return stage


def run1_stage(cfg: Config):
  """Run 1: the generators train after the round's heads."""
  def stage(carry: Carry, r: int):
    run1, row = generator_runs.train_round(cfg, carry.run1, r)
    return dataclasses.replace(carry, run1=run1), row
  return stage


def redraw_stage(cfg: Config, pretrained: PretrainedGenerators, prepared: Prepared, place: distributed.Placement):
  """Run 2: fresh synthetic rows before every round after the first (rows and labels keep their places)."""
  host_features = np.array(prepared.features)
  rows = pretrained.rows

  def stage(carry: Carry, r: int):
    if r == 1:
      return carry, {}
    host_features[rows.offset:] = generator_runs.redraw_synthetic(
        cfg, pretrained.state, pretrained.scale, pretrained.counts, pretrained.length, r)
    return dataclasses.replace(carry, shared=place.replicated(carry.shared._replace(features=host_features))), {}
  return stage


@dataclasses.dataclass(frozen=True)
class Share:
  """Run 2's share of synthetic rows to the nodes: the jitted draw and what it needs each round."""
  draw: Any                  # synthetic_share.make_share(...)
  base_count: np.ndarray     # (C,) each client's own train rows (the engine samples clients from these)
  receive: np.ndarray        # (C, K) rows each client receives per class when every node takes part
  steps: int                 # local steps per epoch over a node's own + received rows


def start_share(cfg: Config, prepared: Prepared, pretrained: PretrainedGenerators, lay: Layout,
                verbose: bool) -> Optional[Share]:
  """The share of ``server_synthetic_samples_per_class``, or None when nothing would be sent (the key is unset,
  or every node already holds every class at that count: the run is then the run without the key)."""
  per_class = cfg.generators.server_synthetic_samples_per_class
  if per_class is None:
    return None
  rows, labels = pretrained.rows, prepared.nodes.clipset.labels
  train_rows = [np.asarray(n["train"], np.int64) for n in prepared.nodes.nodes]
  num_clients, k = lay.train_idx.shape[0], len(prepared.class_names)
  receive = synthetic_share.receive_counts(per_class, train_rows, labels, k, num_clients)
  if not receive.any():
    if verbose:
      print(f"server: server_synthetic_samples_per_class={per_class!r}: every node holds every class at that "
            "count; no synthetic rows are sent to the nodes")
    return None
  syn = np.arange(rows.offset, rows.offset + rows.count)
  bs = cfg.train.batch_size
  width = -(-int((lay.train_count + receive.sum(1)).max()) // bs) * bs
  draw = synthetic_share.make_share(lay.train_idx, lay.train_count, syn, rows.nodes[:rows.count], labels[syn],
                                    receive, width)
  if verbose:
    per_node = ", ".join(f"node {c}: {int(receive[c].sum())} of {int((receive[c] > 0).sum())} class(es)"
                         for c in range(lay.num_real_clients))
    print(f"server: sends each participant synthetic rows of the classes it lacks (server_synthetic_samples_per_"
          f"class={per_class!r}), drawn each round from the other participants' synthetic rows; at full "
          f"participation {per_node}")
  return Share(draw, np.asarray(lay.train_count), receive, width // bs)


def share_stage(cfg: Config, share: Share, place: distributed.Placement):
  """Run 2 with ``server_synthetic_samples_per_class``: this round's training rows of every client. The
  participants are those the heads stage will sample (``engine.sample_participants`` on the server's key);
  only their synthetic rows are drawn from, only they receive."""
  num_clients = len(share.base_count)
  m = engine.num_participants(cfg, num_clients)
  base_count = jnp.asarray(share.base_count)

  def stage(carry: Carry, r: int):
    _, participate = engine.sample_participants(jnp.asarray(place.host(carry.server.rng)), num_clients, m,
                                                base_count)
    idx, count, sent = jax.device_get(share.draw(participate, synthetic_share.share_key(cfg.experiment.seed, r)))
    row = {f"train/node_{c}/received_synthetic_rows": int(sent[c]) for c in range(num_clients) if share.receive[c].any()}
    row["server/shared_synthetic_rows"] = int(sent.sum())
    return dataclasses.replace(carry, data=engine.RoundData(*place.clients((idx, count)))), row
  return stage


def server_stage(cfg: Config, apply_fn, pretrained: PretrainedGenerators, prepared: Prepared,
                 data: engine.RoundData, place: distributed.Placement):
  """Run 2's server: gathers what the round's participants sent, per class, and with ``global_model_train``
  trains the global heads on it after FedAvg (federated/server_train.py)."""
  srows = pretrained.rows
  indices = srows.server_indices()
  aggregate = server_train.make_aggregate(
      indices, srows.nodes, prepared.nodes.clipset.labels[indices], np.arange(len(indices)) < srows.count,
      len(prepared.class_names), cfg.train.batch_size)
  server_step = (_make_server_step(cfg, apply_fn, srows.count + srows.mean_count, place)
                 if cfg.federation.global_model_train else None)

  def stage(carry: Carry, r: int):
    agg_idx, agg_count, per_class = aggregate(carry.participate)
    per_class = np.asarray(per_class)
    row = {"server/synthetic_samples_total": int(per_class.sum()),
           "server/synthetic_samples_classes": int((per_class > 0).sum())}
    if server_step is None:
      return carry, row
    server, srow = server_step(carry.server, carry.clients, data, carry.participate, agg_idx, agg_count,
                               carry.shared, r)
    return dataclasses.replace(carry, server=server), {**row, **srow}
  return stage


def kd_stage(cfg: Config, kd: kd_lib.KD, gens: Optional[tuple[Any, Any]], weights: np.ndarray, length: int,
             place: distributed.Placement):
  """KD: distil the server heads from the clients on generator features (Run 1's generators of this round
  when ``gens`` is None, else Run 2's restored ones)."""
  def stage(carry: Carry, r: int):
    use = gens if gens is not None else (carry.run1.state, carry.run1.scale)
    server, row = kd_round(cfg, kd, carry.server, carry.clients, use, weights, length, r, place)
    return dataclasses.replace(carry, server=place.replicated(server)), row
  return stage


def evaluate_stage(cfg: Config, lay: Layout, apply_fn, place: distributed.Placement):
  """Every ``eval_gap`` rounds and at the last: the server model and each node on the val / test splits."""
  evaluate = make_evaluator(apply_fn, cfg.train.batch_size)
  programs = (jax.jit(jax.vmap(evaluate, in_axes=(0, 0, 0, None))), jax.jit(evaluate),
              jax.jit(jax.vmap(evaluate, in_axes=(0, None, None, None))))
  gap, last = cfg.federation.eval_gap, cfg.federation.global_rounds

  def stage(carry: Carry, r: int):
    if not gap or (r % gap and r != last):
      return carry, {}
    return carry, _evaluate_round(cfg, lay, carry.server, carry.clients, carry.shared, *programs,
                                  cfg.federation.adapter_aggregation_mode, place)
  return stage


def outputs_stage(cfg: Config, outputs: RoundOutputs, apply_fn, prepared: Prepared, host_shared: Shared,
                  place: distributed.Placement):
  """Embedding checkpoints and in-training renders (render/round_outputs.py) on the rounds they are asked for.

  ``shared`` is an argument of the predict program so the features are not baked into it as a constant.
  """
  predict_jit = jax.jit(lambda p, idx, sh: predict_rows(apply_fn, p, idx, sh, cfg.train.batch_size))
  primary = jax.process_index() == 0

  def stage(carry: Carry, r: int):
    if not outputs.wants(r):
      return carry, {}
    out_server, out_clients, out_shared = carry.server.params, carry.clients.params, carry.shared
    if place.multi:  # every process gathers (a collective); process 0 predicts on its own devices
      out_server, out_clients = place.host((carry.server.params, carry.clients.params))
      out_shared = jax.tree.map(jnp.asarray, host_shared) if primary else None
    if not primary:
      return carry, {}
    return carry, outputs(r, predict_fn=lambda p, idx: predict_jit(p, idx, out_shared),
                          server_params=out_server, client_params=out_clients,
                          node_splits=prepared.nodes.nodes, labels=prepared.nodes.clipset.labels)
  return stage


def heads_saver(cfg: Config, checkpointer: ckpt_lib.RoundCheckpointer, run1_extra: Optional[dict]):
  """Checkpoints of a heads run: every ``checkpoint_frequency`` rounds and the last. Run 1's generators are
  saved with the heads (at multiples of either frequency), generators first, so a heads round implies its
  generators and a resume restores both from the same round."""
  g, last = cfg.generators, cfg.federation.global_rounds

  def save(carry: Carry, r: int, force: bool = False) -> None:
    due = r % cfg.federation.checkpoint_frequency == 0 or r == last or force
    if carry.run1 is not None:
      due = due or gen_ckpt.should_save(g, r, last)
      if due and g.generator_save_checkpoint:
        gen_ckpt.save_generators(g, carry.run1.state, r, extra=run1_extra)
    if due:
      checkpointer.save(r, {"server": carry.server, "clients": carry.clients}, cfg.to_dict())
  return save


def generators_only(cfg: Config, prepared: Prepared, log: RunLog, *, resume: bool, verbose: bool) -> dict[str, Any]:
  """``generator_only_mode``: rounds of generator training only (no heads, no text targets, no diffusion),
  through the same round loop. Resumes from the latest complete generator round (the only state of such a run).
  """
  g = cfg.generators
  start = (gen_ckpt.latest_round(g) or 0) if resume else 0
  run = generator_runs.start_run1(cfg, prepared, resume_round=start or None, resume=resume)
  resumed = gen_ckpt.read_extra(g, start) if start and cfg.privacy.dp_level else None
  run, accountant = generator_runs.start_dp(cfg, run, resumed=resumed, verbose=verbose)
  if start:
    log.truncate_after(start)
    if verbose:
      print(f"resumed generators from round {start} ({gen_ckpt.round_dir(g, start)})")
  if verbose:
    print(f"generator-only Run 1: {run.state.layout.num_slots} generator slot(s) "
          f"({'shared' if run.state.layout.shared else 'per node'}, {g.generator_granularity}), "
          f"{run.pool.shape[0]} train rows pooled to {tuple(run.pool.shape[1:])}; writing "
          f"{gen_ckpt.checkpoint_root(g)}")
  if not g.generator_save_checkpoint and verbose:
    print("warning: generator_save_checkpoint is false: nothing of this run will be kept")
  extra = generator_runs.run1_extra(cfg, prepared, run)
  last = cfg.federation.global_rounds

  def save(run1, r: int, force: bool = False) -> None:
    if gen_ckpt.should_save(g, r, last) or force:
      gen_ckpt.save_generators(g, run1.state, r, extra=extra if accountant is None else {**extra,
                                                                                      "dp": accountant.record(r)})

  def train(run1, r: int):
    run1, row = generator_runs.train_round(cfg, run1, r)
    return run1, row if accountant is None else {**row, **accountant.row(r)}

  run, times = run_rounds(run, Rounds([train], save=save), start=start, last=last, log=log, verbose=verbose)
  return log.finish(cfg, extra={
      "generator_checkpoints": str(gen_ckpt.checkpoint_root(g)), "generator_latest_round": gen_ckpt.latest_round(g),
      "generator_slots": run.state.layout.num_slots, "mean_round_seconds_after_first": mean_after_first(times),
      **({"dp": accountant.record(last)} if accountant is not None else {})})


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
