"""Many-client scaling study: the vmapped JAX round against the sequential torch reference.

  python -m experiments.scaling --config experiments/configs/fsdd_tiny.json --clients 1,10,100,1000 \
      [--rounds 3 --warmup 1 --samples-per-client N --local-steps 2 --batch-size 2 --epochs 1 --tokens T \
       --feature-dim D --preset config|reference --baseline torch|none|both --yardstick \
       --memory-budget-gb G --chunk K --out benchmarks/results/scaling]
  python -m experiments.scaling --preset reference --largest-within-gb 24   # compile-only memory fit

Per client count C, every client holds N synthetic samples (cached-feature shaped: T tokens of the
config's AST width, no backbone needed) and trains E local epochs of ceil(N / B) steps with the config's
heads (``make_heads``) and engine (``fed_a2v``). The memory plan (``a2v_jax.memory``) is checked, and the
round compiled, before any client state is allocated. After ``--warmup`` rounds, ``--rounds`` rounds are
timed, interleaved with the baselines' rounds (the machine is shared; its load drifts). Per point: rounds/s,
samples/s, wall and process-CPU seconds, lowering and compile time (which must not grow with C), peak host
RSS (a sampling thread), device peak memory when the backend reports it, bytes per client, the memory plan
and XLA's buffer figure, and analytic training FLOP/s. ``--baseline torch`` times the sequential torch
reference (``a2v_jax.baselines.torch_reference``: one model copy and AdamW per branch per client, FedAvg of
state dicts) on the same data, from the same initial weights, in the same process; ``both`` adds the
reference's AST forward of every sample in every epoch; ``--yardstick`` times a plain 2048^3 matmul between
the rounds. torch gets as many intra-op threads as the JAX CPU client (the cores we may use).

The CLI restarts itself once with ``ALLOCATOR_ENV`` (glibc settings that keep XLA's freed buffers mapped;
see there) unless ``--system-allocator`` is given.

Writes ``scaling.csv``, ``scaling.jsonl`` and ``scaling.png`` (time per round vs C, log-log) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

# torch's OpenMP threads spin-wait between parallel regions by default; on a shared 2-core machine (other
# processes, XLA's own pool) the spinning starves the working threads and made the torch baseline 4-5x
# slower in our measurements. Passive waiting is set so that the baseline is not handicapped.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from a2v_jax import config as config_lib  # noqa: E402
from a2v_jax import memory  # noqa: E402
from a2v_jax.config import Config  # noqa: E402
from a2v_jax.federated import aggregate, engine, optim  # noqa: E402
from a2v_jax.federated.local import Shared  # noqa: E402
from a2v_jax.federated.state import ClientState, ServerState  # noqa: E402
from a2v_jax.models.heads import make_heads  # noqa: E402

# The reference's head widths (spec 2.2-2.4) for FLUX: ~315 M trainable parameters per node.
REFERENCE_PRESET = {"clip_adapter_hidden": [1024, 2048], "t5_adapter_hidden": [1024, 2048, 2048], "map_heads": 16}
REFERENCE_SHAPES = {"feature_dim": 768, "clip": (768,), "t5": (17, 4096)}


def cpu_threads() -> int:
  """Cores this process may use: the size of the XLA CPU client's thread pool."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------- workload


@dataclasses.dataclass(frozen=True)
class Workload:
  """What every client holds and does in one round."""
  num_clients: int
  samples_per_client: int
  batch_size: int
  local_epochs: int
  tokens: int
  feature_dim: int
  target_shapes: dict[str, tuple[int, ...]]
  num_classes: int = 10
  pool_cap: int = 65536  # distinct feature rows; clients index into them (same work, bounded RAM)

  @property
  def steps(self) -> int:
    return engine.steps_per_epoch(self.samples_per_client, self.batch_size)

  @property
  def samples_per_round(self) -> int:
    return self.num_clients * self.local_epochs * self.samples_per_client

  @property
  def pool(self) -> int:
    return min(self.num_clients * self.samples_per_client, self.pool_cap)


def ast_tokens(max_length: int, num_mel_bins: int = 128, patch: int = 16, stride: int = 10) -> int:
  """AST sequence length: 2 special tokens + frequency x time patches."""
  return 2 + ((num_mel_bins - patch) // stride + 1) * ((max_length - patch) // stride + 1)


def workload_dims(cfg: Config) -> tuple[int, int, dict[str, tuple[int, ...]]]:
  """(feature width, tokens, target shapes) of the config's backbones, from config files only."""
  from a2v_jax.backbones import paths, text
  from a2v_jax.backbones.tiny_ast import TINY_AST_CONFIG
  b = cfg.backbones
  if b.ast_model == "tiny":
    width = TINY_AST_CONFIG["hidden_size"]
  else:
    width = json.loads((Path(b.ast_model) / "config.json").read_text())["hidden_size"]
  tokens = ast_tokens(cfg.features.max_length, cfg.features.num_mel_bins)
  if cfg.features.pooled_tokens is not None:  # the cache keeps 2 special tokens + k pooled groups
    tokens = min(tokens, 2 + cfg.features.pooled_tokens)
  if b.clip_text_model == "tiny" and b.t5_model == "tiny":
    t5_len = text._t5_length(cfg.heads.diffusion_type, cfg.text.t5_max_length)
    shapes = {"clip": (cfg.text.clip_max_length, paths.TINY_CLIP_DIM) if cfg.heads.diffusion_type == "sd"
              else (paths.TINY_CLIP_DIM,), "t5": (t5_len, paths.TINY_T5_DIM)}
    shapes = {k: shapes[k] for k in cfg.branches}
  else:
    shapes = text.target_dims(cfg.heads.diffusion_type, b.clip_text_model, b.t5_model,
                              t5_max_length=cfg.text.t5_max_length, clip_max_length=cfg.text.clip_max_length)
  return width, tokens, shapes


class Data(NamedTuple):
  """Synthetic cached features: a pool of rows, and each client's rows into it."""
  features: np.ndarray           # (P, T, D) float32
  labels: np.ndarray             # (P,) int32
  targets: dict[str, np.ndarray]  # {branch: (num_classes, ...)}
  rows: np.ndarray               # (C, N) int32


def synthetic_data(w: Workload, seed: int = 0) -> Data:
  """Class-clustered token features and random per-class targets; client c holds N consecutive rows."""
  rs = np.random.default_rng(seed)
  labels = rs.integers(0, w.num_classes, w.pool).astype(np.int32)
  centres = rs.standard_normal((w.num_classes, w.feature_dim), np.float32)
  feats = rs.standard_normal((w.pool, w.tokens, w.feature_dim), np.float32)
  feats += centres[labels][:, None, :]
  targets = {b: rs.standard_normal((w.num_classes,) + tuple(s), np.float32) for b, s in w.target_shapes.items()}
  rows = (np.arange(w.num_clients)[:, None] * w.samples_per_client + np.arange(w.samples_per_client)) % w.pool
  return Data(feats, labels, targets, rows.astype(np.int32))


def round_data(w: Workload, data: Data) -> engine.RoundData:
  idx = np.zeros((w.num_clients, w.steps * w.batch_size), np.int32)
  idx[:, :w.samples_per_client] = data.rows
  return engine.RoundData(jnp.asarray(idx), jnp.full((w.num_clients,), w.samples_per_client, jnp.int32))


def replicated_init(cfg: Config, init_fn: Callable, num_clients: int,
                    rng: jax.Array) -> tuple[ServerState, ClientState]:
  """``fed_a2v``'s init, except that clients start from copies of the server params.

  Why: in the broadcast modes (avg, weighted) every client receives the global params at the start of
  round 1, so its own initial params are never used; copying avoids C random initialisations, whose
  threefry code is the slowest program to compile on CPU. Keys and optimiser state are as ``init``'s.
  """
  tx, server_tx = optim.client_optimizer(cfg), optim.server_optimizer(cfg)
  server_key, clients_key, rng = jax.random.split(rng, 3)
  params = init_fn(server_key)
  keys = jax.random.split(clients_key, num_clients)
  client_params = aggregate.broadcast(params, num_clients)
  clients = ClientState(params=client_params, opt_state=jax.vmap(tx.init)(client_params),
                        rng=jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
  server = ServerState(params=params, opt_state=server_tx.init(params), round=jnp.zeros((), jnp.int32), rng=rng)
  return server, clients


# ------------------------------------------------------------------------------------------- FLOPs


def forward_flops_per_sample(heads, tokens: int, feature_dim: int) -> int:
  """Matmul FLOPs (2 per multiply-add) of one sample's forward pass through every branch."""
  total = 0
  for b, shape in heads.branch_shapes.items():
    d = shape[-1]
    k = 1 if len(shape) == 1 else shape[0]
    widths = [feature_dim, *heads.hidden[b], d]
    adapter = sum(2 * tokens * a * c for a, c in zip(widths[:-1], widths[1:]))
    r = heads.mlp_ratio
    total += adapter + 2 * tokens * d * d + 2 * tokens * d * 2 * d  # projection, kv
    total += 2 * k * d * d + 4 * k * tokens * d + 2 * k * d * d    # q, attention, proj_out
    total += 2 * k * d * 2 * r * d + 2 * k * r * d * d              # SwishGLU MLP
  return total


def train_flops_per_round(heads, w: Workload) -> int:
  """Forward + backward (2x forward) matmul FLOPs of one round's real samples."""
  return 3 * forward_flops_per_sample(heads, w.tokens, w.feature_dim) * w.samples_per_round


# ------------------------------------------------------------------------------------------ memory


class PeakRSS:
  """Peak resident set size of this process while the context is open (a 5 ms sampling thread)."""

  def __init__(self, interval: float = 0.005):
    import psutil
    self._proc, self._interval = psutil.Process(), interval
    self.start = self.peak = self._proc.memory_info().rss
    self._stop = threading.Event()

  def _run(self):
    while not self._stop.wait(self._interval):
      self.peak = max(self.peak, self._proc.memory_info().rss)

  def __enter__(self):
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._proc.memory_info().rss)


def device_peak_bytes() -> Optional[int]:
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


# ------------------------------------------------------------------------------------------ timing


class JaxRunner:
  """The jitted vmapped round. Plans and compiles on construction; allocates only in ``setup``."""
  backend = "jax"

  def __init__(self, cfg: Config, w: Workload, data: Data, *, budget: Optional[int] = None,
               chunk: Optional[int] = None, seed: int = 0, torch_copies: int = 0):
    """``torch_copies``: params-sized tensors per client the torch baselines will hold in this process
    (model, AdamW moments, gradients: 4 per baseline); reserved out of the budget with the host's copy
    of the features, so that the JAX plan leaves room for them."""
    self.w, self.data, self.seed = w, data, seed
    self.heads = heads = make_heads(cfg, w.target_shapes)
    token_shape = (w.tokens, w.feature_dim)
    apply_fn = lambda p, x: heads.apply({"params": p}, x)
    init_fn = lambda k: heads.init(k, jnp.zeros((1,) + token_shape))["params"]
    fp = memory.client_footprint(apply_fn, init_fn, optim.client_optimizer(cfg), token_shape, w.batch_size,
                                 w.target_shapes)
    fixed = data.features.nbytes + sum(t.nbytes for t in data.targets.values()) + data.rows.nbytes
    budget = (budget or memory.budget_bytes()) - data.features.nbytes - torch_copies * w.num_clients * fp.params
    self.plan = memory.plan(fp, w.num_clients, budget, fixed, chunk or cfg.federation.client_chunk_size)
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, client_chunk_size=self.plan.chunk))
    alg = engine.fed_a2v(cfg, apply_fn, init_fn, steps=w.steps, num_clients=w.num_clients)
    self.init = jax.jit(lambda k: replicated_init(cfg, init_fn, w.num_clients, k))
    abstract_state = jax.eval_shape(self.init, jax.random.PRNGKey(seed))
    shared = Shared(jax.ShapeDtypeStruct(data.features.shape, jnp.float32),
                    jax.ShapeDtypeStruct(data.labels.shape, jnp.int32),
                    {b: jax.ShapeDtypeStruct(t.shape, jnp.float32) for b, t in data.targets.items()})
    rdata = engine.RoundData(jax.ShapeDtypeStruct((w.num_clients, w.steps * w.batch_size), jnp.int32),
                             jax.ShapeDtypeStruct((w.num_clients,), jnp.int32))
    t = time.perf_counter()
    lowered = jax.jit(alg.round, donate_argnums=(0, 1)).lower(*abstract_state, rdata, shared)
    self.lower_s = time.perf_counter() - t
    t = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t
    self.xla_bytes = memory.check_compiled(self.compiled, budget)  # still nothing allocated
    self.footprint = fp
    self.flops, self.samples = train_flops_per_round(heads, w), w.samples_per_round

  def setup(self) -> None:
    t = time.perf_counter()
    d = self.data
    self.shared = Shared(jnp.asarray(d.features), jnp.asarray(d.labels),
                         {b: jnp.asarray(v) for b, v in d.targets.items()})
    self.rdata = round_data(self.w, d)
    self.server, self.clients = _block(self.init(jax.random.PRNGKey(self.seed)))
    self.params0 = jax.device_get(self.server.params)  # host copy: the first round donates the buffers
    self.setup_s = time.perf_counter() - t

  def round(self, r: int) -> None:
    self.server, self.clients, self.metrics = _block(
        self.compiled(self.server, self.clients, self.rdata, self.shared))

  def info(self) -> dict[str, Any]:
    loss = sum(float(np.mean(v)) for k, v in self.metrics.items() if k.endswith("_loss"))
    fp = self.footprint
    return {"loss": loss, "lower_s": self.lower_s, "compile_s": self.compile_s, "setup_s": self.setup_s,
            "chunk": self.plan.chunk, "estimated_bytes": self.plan.estimated, "xla_bytes": self.xla_bytes,
            "param_bytes": fp.params, "opt_bytes": fp.opt_state, "working_bytes": fp.working,
            "device_peak_bytes": device_peak_bytes()}


class TorchRunner:
  """The sequential torch reference on the same data, from the JAX runner's initial params.

  ``params`` is a callable returning them (the JAX runner has them only once it is set up).
  """

  def __init__(self, cfg: Config, w: Workload, data: Data, params: Callable[[], Any], *, with_ast: bool = False,
               seed: int = 0):
    self.cfg, self.w, self.data, self.params, self.with_ast, self.seed = cfg, w, data, params, with_ast, seed
    self.backend = "torch+ast" if with_ast else "torch"
    self.heads = make_heads(cfg, w.target_shapes)
    self.flops, self.samples = train_flops_per_round(self.heads, w), w.samples_per_round

  def setup(self) -> None:
    import torch

    from a2v_jax.baselines import torch_reference as tr
    tr.set_threads(cpu_threads())
    t = time.perf_counter()
    w, data = self.w, self.data
    if self.with_ast:
      features = tr.AstFeatures(*_tiny_torch_ast(w, data, self.seed))
    else:
      feats = torch.from_numpy(data.features)
      features = lambda rows: feats[rows]
    self.ref = tr.build_from_flax(self.heads, self.params(), w.feature_dim, w.num_clients, self.cfg,
                                  features=features, labels=data.labels, targets=data.targets)
    self.setup_s = time.perf_counter() - t
    rng = np.random.default_rng(self.seed)
    self.batches = lambda c: tr.epoch_batches(rng, data.rows[c], w.batch_size, w.local_epochs)
    self.threads = torch.get_num_threads()

  def warmup(self, r: int) -> None:
    """Warms torch's kernels and allocator: a few clients suffice (nothing is compiled)."""
    self.ref.round([self.batches(c) for c in range(min(self.w.num_clients, 4))], epoch0=r * self.w.local_epochs)

  def round(self, r: int) -> None:
    self.metrics = self.ref.round([self.batches(c) for c in range(self.w.num_clients)], epoch0=r * self.w.local_epochs)

  def info(self) -> dict[str, Any]:
    n_params = sum(p.numel() for p in self.ref.global_model.parameters())
    return {"loss": float(sum(np.nanmean(v) for v in self.metrics.values())), "setup_s": self.setup_s,
            "param_bytes": 4 * n_params, "threads": self.threads}


def _tiny_torch_ast(w: Workload, data: Data, seed: int):
  """A tiny random torch ``ASTModel`` (the project's tiny config at width D) and an fbank pool whose
  AST output has exactly T tokens: what the reference recomputes in every epoch."""
  import torch
  from transformers import ASTConfig, ASTModel

  from a2v_jax.backbones.tiny_ast import TINY_AST_CONFIG
  freq = (128 - 16) // 10 + 1
  if (w.tokens - 2) % freq:
    raise ValueError(f"--tokens {w.tokens} is not an AST length (2 + {freq} * k); the AST baseline needs one")
  frames = 16 + 10 * ((w.tokens - 2) // freq - 1)
  conf = dict(TINY_AST_CONFIG, hidden_size=w.feature_dim, max_length=frames, num_mel_bins=128)
  torch.manual_seed(seed)
  model = ASTModel(ASTConfig(**conf))
  fbank = torch.from_numpy(np.random.default_rng(seed).standard_normal((w.pool, frames, 128), np.float32))
  return model, fbank


def time_point(runners: Sequence[Any], *, rounds: int, warmup: int) -> list[dict[str, Any]]:
  """Sets up and warms each runner (peak RSS measured there), then times their rounds interleaved.

  Why interleaved: the machine is shared, and its load drifts over minutes; alternating rounds
  exposes every backend to the same conditions. Wall time and process CPU time (all threads) are
  both recorded; the latter is less sensitive to other processes.
  """
  state = {}
  for run in runners:
    with PeakRSS() as rss:
      run.setup()
      for r in range(warmup):
        (run.warmup if hasattr(run, "warmup") else run.round)(r)
    state[run.backend] = {"wall": [], "cpu": [], "rss": rss}
  load0 = os.getloadavg()[0]
  for r in range(rounds):
    for run in runners:
      t, c = time.perf_counter(), time.process_time()
      run.round(warmup + r)
      state[run.backend]["wall"].append(time.perf_counter() - t)
      state[run.backend]["cpu"].append(time.process_time() - c)
  load1 = os.getloadavg()[0]
  rows = []
  for run in runners:
    s = state[run.backend]
    round_s, cpu_s = float(np.median(s["wall"])), float(np.median(s["cpu"]))
    rows.append({"backend": run.backend, "clients": run.w.num_clients, "rounds_timed": rounds, "round_s": round_s,
                 "round_s_min": float(np.min(s["wall"])), "cpu_s_per_round": cpu_s,
                 "rounds_per_s": 1.0 / round_s, "samples_per_s": run.samples / round_s,
                 "train_gflop_per_round": run.flops / 1e9, "train_gflop_s": run.flops / round_s / 1e9,
                 "train_gflop_per_cpu_s": run.flops / cpu_s / 1e9,
                 "peak_rss_mb": s["rss"].peak / 2 ** 20, "rss_growth_mb": (s["rss"].peak - s["rss"].start) / 2 ** 20,
                 "loadavg_1min": (load0 + load1) / 2, **run.info()})
  return rows


class MatmulRunner:
  """The machine's yardstick, timed between the other rounds: ``reps`` jitted fp32 ``jnp.dot`` n x n."""
  backend = "matmul"

  def __init__(self, w: Workload, n: int = 2048, reps: int = 4):
    self.w, self.n, self.reps = w, n, reps
    self.flops, self.samples = reps * 2 * n ** 3, 0

  def setup(self) -> None:
    self.a = jax.random.normal(jax.random.PRNGKey(0), (self.n, self.n), jnp.float32)
    self.dot = jax.jit(jnp.dot)
    _block(self.dot(self.a, self.a))

  def round(self, r: int) -> None:
    for _ in range(self.reps):
      _block(self.dot(self.a, self.a))

  def info(self) -> dict[str, Any]:
    return {"matmul_n": self.n}


def _block(tree):
  return jax.block_until_ready(tree)


# ------------------------------------------------------------------------------------------- study


def study(cfg: Config, clients: Sequence[int], workload: dict[str, Any], *, rounds: int = 3, warmup: int = 1,
          baseline: str = "torch", budget: Optional[int] = None, chunk: Optional[int] = None, seed: int = 0,
          yardstick: bool = False, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs every client count on JAX (and the baselines); returns one row per (backend, C).

  Args:
    cfg: the run config (heads, optimiser, aggregation).
    clients: the client counts C to measure.
    workload: the other ``Workload`` fields (see ``workload_from_args``); its batch size and epochs
      override the config's.
    rounds, warmup: timed rounds after warm-up rounds.
    baseline: "torch", "both" (adds the AST forward per sample and epoch) or "none".
    budget: memory budget in bytes (default: what the device or host has available).
    chunk: client_chunk_size (default: the memory plan's choice).
    yardstick: also time a plain 2048^3 matmul between the rounds (``MatmulRunner``), so FLOP rates
      can be compared with the machine's under the same load.
  """
  base = dict(workload)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=base["batch_size"],
                                                           local_epochs=base["local_epochs"]))
  rows = []
  for c in clients:
    w = Workload(num_clients=c, **base)
    data = synthetic_data(w, seed)
    log(f"C={c}: {w.samples_per_client} samples x {w.local_epochs} epoch(s) = {w.steps} step(s) of {w.batch_size}, "
        f"{w.tokens} tokens x {w.feature_dim}")
    try:
      copies = {"torch": 4, "both": 8, "none": 0}[baseline]
      jax_run = JaxRunner(cfg, w, data, budget=budget, chunk=chunk, seed=seed, torch_copies=copies)
    except memory.MemoryPlanError as e:
      log(f"  jax: skipped: {e}")
      rows.append({"backend": "jax", "clients": c, "skipped": str(e)})
      continue
    log(f"  jax: {jax_run.plan.describe()}; compiled in {jax_run.compile_s:.1f} s")
    runners = [jax_run] + [TorchRunner(cfg, w, data, lambda: jax_run.params0, with_ast=a, seed=seed)
                           for a in {"torch": [False], "both": [False, True], "none": []}[baseline]]
    runners += [MatmulRunner(w)] if yardstick else []
    point = time_point(runners, rounds=rounds, warmup=warmup)
    for row in point[1:]:
      if row["backend"] == "matmul":
        continue
      row["slowdown_vs_jax"] = row["round_s"] / point[0]["round_s"]
      row["cpu_slowdown_vs_jax"] = row["cpu_s_per_round"] / point[0]["cpu_s_per_round"]
    for row in point:
      log(f"  {row['backend']:<9} {row['round_s']:.4f} s/round ({row['cpu_s_per_round']:.4f} CPU s), "
          f"{row['train_gflop_s']:.1f} GFLOP/s"
          + (f", {row['slowdown_vs_jax']:.1f}x the JAX time" if "slowdown_vs_jax" in row else ""))
    rows += point
    del jax_run, runners
  return rows


def largest_clients(cfg: Config, budget: int, *, probes: tuple[int, int] = (2, 8),
                    log: Callable[[str], None] = print, **workload) -> int:
  """The largest client count whose compiled round fits ``budget`` bytes (compiles only, allocates nothing)."""
  def bytes_at(c: int) -> Optional[int]:
    w = Workload(num_clients=c, **workload)
    need = JaxRunner(cfg, w, synthetic_data(w), budget=1 << 60).xla_bytes
    log(f"  C={c}: XLA assigns {memory.gib(need or 0)}")
    return need
  return memory.largest_count(bytes_at, budget, probes)


def write_outputs(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
  """scaling.csv, scaling.jsonl (first line: the run's metadata) and scaling.png."""
  out.mkdir(parents=True, exist_ok=True)
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(out / "scaling.csv", "w", newline="") as f:
    wr = csv.DictWriter(f, keys)
    wr.writeheader()
    wr.writerows(rows)
  with open(out / "scaling.jsonl", "w") as f:
    f.write(json.dumps({"meta": meta}) + "\n")
    for r in rows:
      f.write(json.dumps(r) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for backend in dict.fromkeys(r["backend"] for r in rows if r["backend"] != "matmul"):  # the yardstick is no round
    pts = sorted((r["clients"], r["round_s"]) for r in rows if r["backend"] == backend and "round_s" in r)
    if pts:
      ax.loglog(*zip(*pts), marker="o", label=backend)
  ax.set_xlabel("clients per round")
  ax.set_ylabel("seconds per round")
  ax.set_title(meta.get("title", "round time vs clients"), fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "scaling.png", dpi=120)
  plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
  head = f"{'backend':<10}{'clients':>8}{'s/round':>10}{'rounds/s':>10}{'samples/s':>11}{'GFLOP/s':>9}" \
         f"{'compile s':>10}{'RSS MB':>8}{'vs JAX':>8}"
  lines = [head, "-" * len(head)]
  for r in rows:
    if "skipped" in r:
      lines.append(f"{r['backend']:<10}{r['clients']:>8}  skipped (memory plan)")
      continue
    comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
    vs = f"{r['slowdown_vs_jax']:.1f}x" if "slowdown_vs_jax" in r else "1x"
    lines.append(f"{r['backend']:<10}{r['clients']:>8}{r['round_s']:>10.4f}{r['rounds_per_s']:>10.2f}"
                 f"{r['samples_per_s']:>11.0f}{r['train_gflop_s']:>9.2f}{comp:>10}{r['peak_rss_mb']:>8.0f}{vs:>8}")
  return "\n".join(lines)


# glibc returns every large buffer to the kernel when it is freed, so each round of the JAX program
# page-faults its ~GB of XLA temporaries in again (measured: 480 k minor faults and 0.9 s of system
# time per 1000-client round, a third of the round). One arena that never unmaps or trims keeps them.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def reexec_with_allocator_env(module: str, argv: Sequence[str]) -> None:
  """Restarts ``python -m module argv`` with ``ALLOCATOR_ENV`` (glibc reads it only at start-up)."""
  if not sys.platform.startswith("linux") or all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
    return
  env = dict(os.environ, **ALLOCATOR_ENV)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="experiments/configs/fsdd_tiny.json")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
  p.add_argument("--clients", default="1,10,100,1000")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--samples-per-client", type=int, default=None, help="default: local steps x batch size")
  p.add_argument("--local-steps", type=int, default=2, help="steps per epoch when --samples-per-client is unset")
  p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
  p.add_argument("--epochs", type=int, default=None, help="local epochs; default: the config's")
  p.add_argument("--tokens", type=int, default=None, help="default: the config's AST length")
  p.add_argument("--feature-dim", type=int, default=None, help="default: the config's AST width")
  p.add_argument("--preset", choices=["config", "reference"], default="config",
                 help="reference: the reference's head widths and shapes (768 -> clip 768, t5 17x4096)")
  p.add_argument("--baseline", choices=["torch", "none", "both"], default="torch")
  p.add_argument("--memory-budget-gb", type=float, default=None, help="default: 90%% of what is available")
  p.add_argument("--chunk", type=int, default=None, help="client_chunk_size (default: the plan's choice)")
  p.add_argument("--largest-within-gb", type=float, default=None,
                 help="only report the largest client count whose compiled round fits this many GiB")
  p.add_argument("--yardstick", action="store_true", help="time a 2048^3 matmul between the rounds")
  p.add_argument("--system-allocator", action="store_true",
                 help="keep glibc's default malloc settings (no restart with ALLOCATOR_ENV)")
  p.add_argument("--out", default="benchmarks/results/scaling")
  return p.parse_args(argv)


def config_for(args: argparse.Namespace) -> tuple[Config, dict]:
  overrides = list(args.set)
  extra: dict[str, Any] = {}
  if args.preset == "reference":
    overrides += [f"{k}={json.dumps(v)}" for k, v in REFERENCE_PRESET.items()]
    extra = {"feature_dim": args.feature_dim or REFERENCE_SHAPES["feature_dim"],
             "target_shapes": {"clip": REFERENCE_SHAPES["clip"], "t5": REFERENCE_SHAPES["t5"]}}
  return config_lib.load(args.config, overrides), extra


def workload_from_args(cfg: Config, args: argparse.Namespace, extra: dict) -> dict[str, Any]:
  """The per-client workload fields (everything but C) the CLI arguments describe."""
  width, t_cfg, shapes = workload_dims(cfg)
  b = args.batch_size or cfg.train.batch_size
  return dict(samples_per_client=args.samples_per_client or args.local_steps * b, batch_size=b,
              local_epochs=args.epochs or cfg.train.local_epochs, tokens=args.tokens or t_cfg,
              feature_dim=extra.get("feature_dim", args.feature_dim) or width,
              target_shapes=dict(extra.get("target_shapes") or shapes))


def largest_for_args(cfg: Config, args: argparse.Namespace, extra: dict) -> dict[str, Any]:
  wl = workload_from_args(cfg, args, extra)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=wl["batch_size"],
                                                           local_epochs=wl["local_epochs"]))
  budget = int(args.largest_within_gb * memory.GiB)
  print(f"largest client count within {memory.gib(budget)} ({args.preset} heads, {wl['tokens']} tokens x "
        f"{wl['feature_dim']}, batch {wl['batch_size']}, {cfg.experiment.param_dtype}):")
  c = largest_clients(cfg, budget, **wl)
  print(f"largest client count: {c}")
  return {"largest_clients": c, "budget_bytes": budget, **{k: v for k, v in wl.items() if k != "target_shapes"}}


def main(argv=None) -> list[dict[str, Any]]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if not args.system_allocator:
    reexec_with_allocator_env("experiments.scaling", argv)
  cfg, extra = config_for(args)
  clients = [int(c) for c in args.clients.split(",")]
  budget = int(args.memory_budget_gb * memory.GiB) if args.memory_budget_gb else None
  if args.largest_within_gb:
    return [largest_for_args(cfg, args, extra)]
  rows = study(cfg, clients, workload_from_args(cfg, args, extra), rounds=args.rounds, warmup=args.warmup,
               baseline=args.baseline, budget=budget, chunk=args.chunk, yardstick=args.yardstick)
  meta = {"argv": vars(args), "threads": cpu_threads(), "allocator_env": {k: os.environ.get(k) for k in ALLOCATOR_ENV},
          "jax": jax.__version__, "device": str(jax.devices()[0]),
          "title": f"{cfg.experiment.name} ({args.preset} heads), {cpu_threads()} CPU threads"}
  write_outputs(rows, Path(args.out), meta)
  print(table(rows))
  print(f"wrote {args.out}/scaling.csv, scaling.jsonl, scaling.png")
  return rows


if __name__ == "__main__":
  main()
