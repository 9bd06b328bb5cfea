"""Per-node trainable heads: token-wise Adapter MLP + MAPBlock latent pooling, one branch per text encoder.

Shapes follow the reference: the clip branch maps AST tokens (N, D_ast) to the
pooled CLIP vector (K=1, squeezed) for FLUX or to the 77 CLIP hidden states for SD; the t5 branch
maps them to K T5 token states (17 for FLUX). The reference's MAPBlock is almost certainly
Voltron's (input projection, learned latents, post-RMSNorm, SwishGLU MLP); we follow it, with
the head count taken literally from the config (the reference's n_heads=8 meant 16 heads).

The reference Adapter is private; we use an MLP with a per-token LayerNorm on its input (the
reference experimented with an input BatchNorm "for heterogeneous batch stability": a LayerNorm
gives the same stabilisation without batch statistics, which would otherwise differ per node and
be averaged meaninglessly by FedAvg) and GELU between layers.

References:
  Karamcheti et al. 2023, "Language-Driven Representation Learning for Robotics" (Voltron MAPBlock).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from a2v_jax.config import Config


class RMSNorm(nn.Module):
  """x / max(rms(x), eps) * g, as Voltron's MAPBlock."""
  eps: float = 1e-8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    g = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(rms, self.eps)).astype(x.dtype) * g.astype(x.dtype)


class Adapter(nn.Module):
  """Token-wise MLP: LayerNorm -> [Dense -> GELU]* -> Dense(out_dim)."""
  hidden: Sequence[int]
  out_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.LayerNorm(dtype=self.dtype)(x)
    for width in self.hidden:
      x = nn.gelu(nn.Dense(width, dtype=self.dtype)(x))
    return nn.Dense(self.out_dim, dtype=self.dtype)(x)


class MAPBlock(nn.Module):
  """Multi-head attention pooling of N tokens into K learned latents (Voltron-style).

  Returns (B, D) when K == 1 (the reference squeezes), else (B, K, D).
  """
  n_latents: int
  embed_dim: int
  n_heads: int
  mlp_ratio: int = 4
  dtype: jnp.dtype = jnp.float32
  latents_init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    d, k, h = self.embed_dim, self.n_latents, self.n_heads
    if d % h:
      raise ValueError(f"MAPBlock embed_dim {d} is not divisible by n_heads {h}")
    b = x.shape[0]
    x = nn.Dense(d, dtype=self.dtype, name="projection")(x)
    latents = self.param("latents", nn.initializers.normal(self.latents_init_std), (k, d), jnp.float32)
    latents = jnp.broadcast_to(latents.astype(self.dtype), (b, k, d))
    q = nn.Dense(d, use_bias=False, dtype=self.dtype, name="q")(latents)
    kv = nn.Dense(2 * d, use_bias=False, dtype=self.dtype, name="kv")(x)
    key, value = jnp.split(kv, 2, axis=-1)
    split = lambda t: t.reshape(t.shape[:-1] + (h, d // h))
    attn_mask = None if mask is None else mask[:, None, None, :].astype(bool)
    attended = jax.nn.dot_product_attention(split(q), split(key), split(value), mask=attn_mask)
    attended = nn.Dense(d, dtype=self.dtype, name="proj_out")(attended.reshape(b, k, d))
    latents = RMSNorm(name="norm1")(latents + attended)
    hidden = nn.Dense(2 * self.mlp_ratio * d, dtype=self.dtype, name="mlp_in")(latents)
    a, gate = jnp.split(hidden, 2, axis=-1)
    mlp = nn.Dense(d, dtype=self.dtype, name="mlp_out")(a * nn.silu(gate))
    latents = RMSNorm(name="norm2")(latents + mlp)
    return latents[:, 0] if k == 1 else latents


class Branch(nn.Module):
  """Adapter (token-wise, D_ast -> D_out) followed by a MAPBlock with K latents."""
  hidden: Sequence[int]
  out_dim: int
  n_latents: int
  n_heads: int
  mlp_ratio: int
  dtype: jnp.dtype = jnp.float32
  latents_init_std: float = 0.02

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    x = Adapter(self.hidden, self.out_dim, self.dtype, name="adapter")(tokens)
    return MAPBlock(self.n_latents, self.out_dim, self.n_heads, self.mlp_ratio, self.dtype,
                    self.latents_init_std, name="projection")(x, mask)


class A2VHeads(nn.Module):
  """All branches of one node. Output: {branch: (B, D) or (B, K, D)}, matching the target table."""
  branch_shapes: Mapping[str, tuple[int, ...]]  # per-sample target shape, (D,) or (K, D)
  hidden: Mapping[str, Sequence[int]]
  n_heads: int
  mlp_ratio: int
  dtype: jnp.dtype = jnp.float32
  latents_init_std: float = 0.02

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    chex.assert_rank(tokens, 3)
    out = {}
    for name, shape in self.branch_shapes.items():
      k = 1 if len(shape) == 1 else shape[0]
      out[name] = Branch(tuple(self.hidden[name]), shape[-1], k, self.n_heads, self.mlp_ratio,
                         self.dtype, self.latents_init_std, name=name)(tokens, mask)
    return out


def make_heads(cfg: Config, target_shapes: Mapping[str, tuple[int, ...]]) -> A2VHeads:
  """Builds the heads for ``cfg.heads.diffusion_type`` sized from the per-class target shapes.

  Args:
    cfg: the run config (widths, heads, dtype).
    target_shapes: {branch: per-sample target shape}, e.g. {"clip": (768,), "t5": (17, 4096)}.
  """
  missing = [b for b in cfg.branches if b not in target_shapes]
  if missing:
    raise ValueError(f"diffusion_type '{cfg.heads.diffusion_type}' needs targets for branches "
                     f"{list(cfg.branches)}, but the text targets hold only {sorted(target_shapes)}")
  shapes = {b: tuple(target_shapes[b]) for b in cfg.branches}
  for b, s in shapes.items():
    if len(s) not in (1, 2):
      raise ValueError(f"target of branch '{b}' must be (D,) or (K, D), got {s}")
  hidden = {"clip": cfg.heads.clip_adapter_hidden, "t5": cfg.heads.t5_adapter_hidden}
  dtype = jnp.bfloat16 if cfg.experiment.param_dtype == "bfloat16" else jnp.float32
  return A2VHeads(shapes, hidden, cfg.heads.map_heads, cfg.heads.map_mlp_ratio, dtype,
                  cfg.heads.map_latents_init_std)


def count_params(module: nn.Module, token_shape: tuple[int, int]) -> dict[str, int]:
  """Trainable parameters per branch, from ``jax.eval_shape`` (allocates nothing)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1,) + tuple(token_shape)))
  params = shapes["params"]
  return {b: sum(int(x.size) for x in jax.tree.leaves(p)) for b, p in params.items()}


def head_functions(heads: A2VHeads, token_shape: Sequence[int]):
  """``(apply, init)``: the heads as pure functions of their params, the form the engine, the evaluator and
  the generate step take: ``apply(params, tokens) -> {branch: output}`` (tokens cast to float32, so cached
  float16 features are accepted) and ``init(key) -> params`` for one node."""
  def apply(params, tokens):
    return heads.apply({"params": params}, tokens.astype(jnp.float32))

  def init(key):
    return heads.init(key, jnp.zeros((1,) + tuple(token_shape)))["params"]

  return apply, init
