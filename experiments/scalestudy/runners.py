"""The study's backends, each with ``setup()``, ``round(r)`` and ``info()``: the jitted vmapped JAX round
(planned and compiled before anything is allocated), the sequential torch reference on the same data
and initial weights (optionally with the reference's AST forward per sample and epoch), and a plain
matmul as the machine's yardstick, at 2048^3 and at the step's own shapes."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.federated import memory
from a2v_jax.config import Config
from a2v_jax.federated import engine, optim
from a2v_jax.federated.local import Shared
from a2v_jax.models.heads import make_heads
from experiments.scalestudy.workload import (Data, Workload, client_rows, cpu_threads, dense_shapes,
                                             replicated_init, round_data, train_flops_per_round)

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
                                 w.target_shapes, drift_correction=cfg.federation.local_drift_correction,
                                 fedprox_mu=cfg.federation.fedprox_mu)
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


class PopulationRunner:
  """A round over ``population`` clients of which ``cohort`` train (``federated/population.py``): only the cohort's
  data (``client_rows`` of the sampled ids) and states are on the device; persistent states live in a host store.

  ``w`` describes one client and the cohort (``num_clients`` = cohort): a round's samples and FLOPs are the cohort's.
  """
  backend = "jax-population"

  def __init__(self, cfg: Config, w: Workload, population: int, data: Data, *, client_state: str = "stateless",
               seed: int = 0, store_dir: Optional[str] = None):
    from a2v_jax.federated import population as pop_lib
    self.w, self.population, self.data, self.seed, self.client_state = w, population, data, seed, client_state
    self.heads = heads = make_heads(cfg, w.target_shapes)
    token_shape = (w.tokens, w.feature_dim)
    self.apply_fn = lambda p, x: heads.apply({"params": p}, x)
    self.init_fn = lambda k: heads.init(k, jnp.zeros((1,) + token_shape))["params"]
    self.cfg, self.store_dir, self._pop_lib = cfg, store_dir, pop_lib
    pool_w = dataclasses.replace(w, num_clients=population)  # the population's pool, as the full program's

    def data_fn(ids):
      idx = np.zeros((len(ids), w.steps * w.batch_size), np.int32)
      idx[:, :w.samples_per_client] = client_rows(pool_w, ids)
      return idx, np.full(len(ids), w.samples_per_client, np.int32)

    self.data_fn = data_fn
    self.flops, self.samples = train_flops_per_round(heads, w), w.samples_per_round
    self.compile_s = self.lower_s = 0.0

  def setup(self) -> None:
    t = time.perf_counter()
    d, cfg, pop_lib = self.data, self.cfg, self._pop_lib
    self.shared = Shared(jnp.asarray(d.features), jnp.asarray(d.labels),
                         {b: jnp.asarray(v) for b, v in d.targets.items()})
    server, one = jax.jit(lambda k: replicated_init(cfg, self.init_fn, 1, k))(jax.random.PRNGKey(self.seed))
    template = jax.tree.map(lambda x: x[0], one)
    keys = None
    if self.client_state == "persistent":  # every client its own key, drawn as replicated_init draws them
      clients_key = jax.random.split(jax.random.PRNGKey(self.seed), 3)[1]
      keys = np.asarray(jax.vmap(lambda k: jax.random.fold_in(k, 1))(jax.random.split(clients_key, self.population)))
    self.pop = pop_lib.make_population_round(cfg, self.apply_fn, self.init_fn, steps=self.w.steps,
                                             population=self.population, cohort=self.w.num_clients,
                                             data_fn=self.data_fn, client_state=self.client_state,
                                             template=template, keys=keys, store_dir=self.store_dir)
    self.server = _block(server)
    self.setup_s = time.perf_counter() - t

  def warmup(self, r: int) -> None:
    t = time.perf_counter()
    self.round(r)
    self.compile_s += time.perf_counter() - t  # the first round compiles (sampling, fresh states, the cohort step)

  def round(self, r: int) -> None:
    self.server, self.metrics, _ = self.pop(self.server, self.shared)
    _block(self.server)

  def info(self) -> dict[str, Any]:
    loss = sum(float(np.mean(v)) for k, v in self.metrics.items() if k.endswith("_loss"))
    store = self.pop.store
    return {"loss": loss, "population": self.population, "cohort": self.w.num_clients,
            "client_state": self.client_state, "store_bytes": store.nbytes if store is not None else 0,
            "first_rounds_s": self.compile_s, "setup_s": self.setup_s, "device_peak_bytes": device_peak_bytes()}


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

    from a2v_jax.reference import torch_baseline as tr
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


class StepShapesMatmulRunner:
  """The yardstick at the workload's own shapes: the plain fp32 ``jnp.dot`` products of one client's
  local step (every Dense layer's forward, input-gradient and weight-gradient product, at B x rows by
  in x out), one jitted program called ``reps`` times.

  Why beside the 2048^3 one: a 2048^3 product is the machine's best case, but heads 32-128 wide
  contract over 32-128 and no BLAS reaches that rate there. This runner says what plain dots of the
  step's shapes reach on the same machine under the same load. ``reps`` is sized to about the FLOPs of the 2048^3 yardstick (at most ``max_reps``
  calls, so tiny shapes time the dispatch of each call too).
  """
  backend = "matmul@step"

  def __init__(self, w: Workload, heads, target_flops: float = 4 * 2 * 2048 ** 3, max_reps: int = 2000):
    self.w = w
    self.shapes = [(w.batch_size * m, i, o) for m, i, o in dense_shapes(heads, w.tokens, w.feature_dim)]
    per_call = sum(6 * m * i * o for m, i, o in self.shapes)
    self.reps = int(min(max_reps, max(1, round(target_flops / per_call))))
    self.flops, self.samples = self.reps * per_call, 0

  def setup(self) -> None:
    keys = jax.random.split(jax.random.PRNGKey(0), 3 * len(self.shapes))
    self.args = [(jax.random.normal(keys[3 * j], (m, i)), jax.random.normal(keys[3 * j + 1], (i, o)),
                  jax.random.normal(keys[3 * j + 2], (m, o))) for j, (m, i, o) in enumerate(self.shapes)]
    self.step = jax.jit(lambda args: [(jnp.dot(x, k), jnp.dot(g, k.T), jnp.dot(x.T, g)) for x, k, g in args])
    _block(self.step(self.args))

  def round(self, r: int) -> None:
    for _ in range(self.reps):
      out = self.step(self.args)
    _block(out)

  def info(self) -> dict[str, Any]:
    return {"matmul_reps": self.reps, "matmul_shapes": [list(s) for s in self.shapes]}


def _block(tree):
  return jax.block_until_ready(tree)
