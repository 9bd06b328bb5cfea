"""What every client holds and does in one round of the study: synthetic cached features of the config's
shapes (no backbone needed), the round's index arrays, and the analytic matmul FLOPs of training."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.config import Config
from a2v_jax.federated import aggregate, engine, optim
from a2v_jax.federated.state import ClientState, ServerState

# The reference's head widths for FLUX: ~315 M trainable parameters per node.
REFERENCE_PRESET = {"clip_adapter_hidden": [1024, 2048], "t5_adapter_hidden": [1024, 2048, 2048], "map_heads": 16}
REFERENCE_SHAPES = {"feature_dim": 768, "clip": (768,), "t5": (17, 4096)}


def cpu_threads() -> int:
  """Cores this process may use: the size of the XLA CPU client's thread pool."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


def client_rows(w: Workload, ids: np.ndarray) -> np.ndarray:
  """(len(ids), N) pool rows of clients ``ids``: client c holds N consecutive rows (mod the pool), a function of
  its id alone, so a population's data is drawn on demand, the same whenever a client is sampled."""
  ids = np.asarray(ids, np.int64)
  return ((ids[:, None] * w.samples_per_client + np.arange(w.samples_per_client)) % w.pool).astype(np.int32)


def synthetic_data(w: Workload, seed: int = 0, *, with_rows: bool = True) -> Data:
  """Class-clustered token features and random per-class targets; client c holds ``client_rows``.
  ``with_rows`` False leaves ``rows`` empty (a population's rows are drawn on demand)."""
  rs = np.random.default_rng(seed)
  labels = rs.integers(0, w.num_classes, w.pool).astype(np.int32)
  centres = rs.standard_normal((w.num_classes, w.feature_dim), np.float32)
  feats = rs.standard_normal((w.pool, w.tokens, w.feature_dim), np.float32)
  feats += centres[labels][:, None, :]
  targets = {b: rs.standard_normal((w.num_classes,) + tuple(s), np.float32) for b, s in w.target_shapes.items()}
  rows = client_rows(w, np.arange(w.num_clients if with_rows else 0))
  return Data(feats, labels, targets, rows)


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
                        rng=jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys),
                        control=engine.initial_control(cfg, client_params))
  server = ServerState(params=params, opt_state=server_tx.init(params), round=jnp.zeros((), jnp.int32), rng=rng,
                       control=engine.initial_control(cfg, params))
  return server, clients


def dense_shapes(heads, tokens: int, feature_dim: int) -> list[tuple[int, int, int]]:
  """(rows per sample, in, out) of every Dense matmul of one sample's forward pass through every branch.

  Rows are the T tokens for the adapter, the MAPBlock's input projection and its keys / values, and the
  K latents for the rest (queries, output projection, SwishGLU MLP).
  """
  shapes = []
  for b, shape in heads.branch_shapes.items():
    d, r = shape[-1], heads.mlp_ratio
    k = 1 if len(shape) == 1 else shape[0]
    widths = [feature_dim, *heads.hidden[b], d]
    shapes += [(tokens, a, c) for a, c in zip(widths[:-1], widths[1:])]  # adapter
    shapes += [(tokens, d, d), (tokens, d, 2 * d)]                          # projection, kv
    shapes += [(k, d, d), (k, d, d)]                                        # q, proj_out
    shapes += [(k, d, 2 * r * d), (k, r * d, d)]                            # SwishGLU MLP
  return shapes


def forward_flops_per_sample(heads, tokens: int, feature_dim: int) -> int:
  """Matmul FLOPs (2 per multiply-add) of one sample's forward pass through every branch: the Dense
  layers and the attention's two batched products (scores and weighted values)."""
  attention = sum(4 * (1 if len(s) == 1 else s[0]) * tokens * s[-1] for s in heads.branch_shapes.values())
  return sum(2 * m * i * o for m, i, o in dense_shapes(heads, tokens, feature_dim)) + attention


def train_flops_per_round(heads, w: Workload) -> int:
  """Forward + backward (2x forward) matmul FLOPs of one round's real samples."""
  return 3 * forward_flops_per_sample(heads, w.tokens, w.feature_dim) * w.samples_per_round
