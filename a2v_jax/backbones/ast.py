"""Audio Spectrogram Transformer (AST) in flax.linen, loaded from a local HF directory.

Why project code: transformers 5 has no Flax models, and no version ever had a Flax AST.
The frozen AST only produces features, so this is the inference path alone: patch
embedding, CLS + distillation tokens, position embeddings, pre-LN ViT encoder, final
LayerNorm; no dropout, no attention mask (HF's AST uses none either: padding frames are
zeros that the model attends to). Parity with torch ``ASTModel`` is tested to 1e-5.

Weights are ported from the safetensors keys that ``save_pretrained`` writes (the legacy
``encoder.layer.N.attention.attention.query`` names, which the real
``MIT/ast-finetuned-audioset-10-10-0.4593`` checkpoint also uses); transformers 5's
in-memory names (``layers.N.attention.q_proj``) are accepted too. An
``ASTForAudioClassification`` checkpoint is read through its
``audio_spectrogram_transformer.`` prefix and its classifier is ignored.

Position embeddings for another input length (``max_length``): the patch grid is
(frequency rows) x (time columns), frequency-major, and clips are right-padded, so time
column j always covers frames [10 j, 10 j + 16).
  * shorter than the checkpoint: keep every frequency row and the first time columns
    (crop). Each kept patch gets exactly the embedding it has when the same clip is padded
    to the checkpoint's length; what changes is only that the dropped columns (padding,
    for clips that fit) are no longer attended to.
  * longer: linear interpolation along time only (bilinear with an unchanged frequency
    axis, half-pixel centres, as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)``). An extrapolation the model never saw; prefer shorter.
The number of mel bins must match the checkpoint (the frequency grid is never changed).

References:
  Gong, Chung and Glass, "AST: Audio Spectrogram Transformer", Interspeech 2021.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from a2v_jax.backbones import hf
from a2v_jax.types import Params

BASE_PREFIX = "audio_spectrogram_transformer."
MODEL_TYPE = "audio-spectrogram-transformer"

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class ASTSettings:
  """Architecture of an AST and the input length it is built for.

  Defaults are those of ``MIT/ast-finetuned-audioset-10-10-0.4593``.
  """
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True
  patch_size: int = 16
  frequency_stride: int = 10
  time_stride: int = 10
  num_mel_bins: int = 128
  # fbank frames the module takes, and those the checkpoint's position embeddings cover.
  max_length: int = 1024
  checkpoint_max_length: int = 1024

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise hf.BackboneLoadError(f"AST hidden_act '{self.hidden_act}' is not supported; "
                               f"choose one of {sorted(_ACTIVATIONS)}")
    if self.hidden_size % self.num_heads:
      raise hf.BackboneLoadError(f"AST hidden_size {self.hidden_size} is not divisible by "
                               f"num_attention_heads {self.num_heads}")
    for name in ("max_length", "checkpoint_max_length"):
      if getattr(self, name) < self.patch_size:
        raise hf.BackboneLoadError(f"AST {name} {getattr(self, name)} is shorter than one patch "
                                 f"({self.patch_size} frames)")
    if self.num_mel_bins < self.patch_size:
      raise hf.BackboneLoadError(f"AST num_mel_bins {self.num_mel_bins} is smaller than one patch")

  @property
  def frequency_patches(self) -> int:
    return (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1

  @property
  def time_patches(self) -> int:
    return (self.max_length - self.patch_size) // self.time_stride + 1

  @property
  def checkpoint_time_patches(self) -> int:
    return (self.checkpoint_max_length - self.patch_size) // self.time_stride + 1

  @property
  def num_tokens(self) -> int:
    """Output sequence length: CLS + distillation + patches (1214 for the real checkpoint)."""
    return 2 + self.frequency_patches * self.time_patches

  @property
  def position_policy(self) -> Literal["exact", "crop", "interpolate"]:
    t, t0 = self.time_patches, self.checkpoint_time_patches
    return "exact" if t == t0 else ("crop" if t < t0 else "interpolate")

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any], max_length: Optional[int] = None,
                     where: str = "config.json") -> "ASTSettings":
    """Reads an HF ``ASTConfig`` dict; ``max_length`` None keeps the checkpoint's."""
    patch = config.get("patch_size", 16)
    if isinstance(patch, (list, tuple)):
      if len(set(patch)) != 1:
        raise hf.BackboneLoadError(f"{where}: non-square patch_size {patch} is not supported")
      patch = patch[0]
    try:
      ckpt_len = int(config.get("max_length", 1024))
      return cls(
          hidden_size=int(config.get("hidden_size", 768)),
          num_layers=int(config.get("num_hidden_layers", 12)),
          num_heads=int(config.get("num_attention_heads", 12)),
          intermediate_size=int(config.get("intermediate_size", 3072)),
          hidden_act=str(config.get("hidden_act", "gelu")),
          layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
          qkv_bias=bool(config.get("qkv_bias", True)),
          patch_size=int(patch),
          frequency_stride=int(config.get("frequency_stride", 10)),
          time_stride=int(config.get("time_stride", 10)),
          num_mel_bins=int(config.get("num_mel_bins", 128)),
          max_length=ckpt_len if max_length is None else int(max_length),
          checkpoint_max_length=ckpt_len,
      )
    except hf.BackboneLoadError as e:
      raise hf.BackboneLoadError(f"{where}: {e}") from e
    except (TypeError, ValueError) as e:
      raise hf.BackboneLoadError(f"{where}: bad AST config value ({e})") from e


class ASTEmbeddings(nn.Module):
  """fbank (B, T, F) -> [CLS, DIST, patches] + position embeddings, (B, N, D)."""
  settings: ASTSettings
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, fbank: jax.Array) -> jax.Array:
    s = self.settings
    d = s.hidden_size
    # HF: (B, T, F) -> (B, 1, F, T): frequency is the conv's height, time its width.
    x = jnp.swapaxes(fbank.astype(self.dtype), 1, 2)[..., None]
    x = nn.Conv(d, (s.patch_size, s.patch_size), strides=(s.frequency_stride, s.time_stride),
                padding="VALID", dtype=self.dtype, name="patch")(x)
    x = x.reshape(x.shape[0], -1, d)  # frequency-major, as torch's flatten(2)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
    dist = self.param("distillation_token", nn.initializers.zeros, (1, 1, d))
    pos = self.param("position_embeddings", nn.initializers.zeros, (1, s.num_tokens, d))
    b = x.shape[0]
    special = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)),
                               jnp.broadcast_to(dist, (b, 1, d))], axis=1).astype(self.dtype)
    return jnp.concatenate([special, x], axis=1) + pos.astype(self.dtype)


class ASTLayer(nn.Module):
  """One pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  settings: ASTSettings
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.settings
    heads, head_dim = s.num_heads, s.hidden_size // s.num_heads
    norm = functools.partial(nn.LayerNorm, epsilon=s.layer_norm_eps, dtype=self.dtype,
                             use_fast_variance=False)
    dense = functools.partial(nn.Dense, dtype=self.dtype)

    h = norm(name="layernorm_before")(x)
    split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)  # (B, N, H, Dh)
    q = split(dense(s.hidden_size, use_bias=s.qkv_bias, name="query")(h))
    k = split(dense(s.hidden_size, use_bias=s.qkv_bias, name="key")(h))
    v = split(dense(s.hidden_size, use_bias=s.qkv_bias, name="value")(h))
    a = jax.nn.dot_product_attention(q, k, v)
    x = x + dense(s.hidden_size, name="attention_output")(a.reshape(x.shape))

    h = norm(name="layernorm_after")(x)
    h = _ACTIVATIONS[s.hidden_act](dense(s.intermediate_size, name="fc1")(h))
    return x + dense(s.hidden_size, name="fc2")(h)


class ASTModule(nn.Module):
  """AST encoder: fbank (B, T=max_length, F=num_mel_bins) -> last_hidden_state.

  Attributes:
    settings: the architecture and input length.
    cls_only: return token 0 only, (B, 1, D), as the reference's ``use_cls_token_only``
      (CLS alone, not HF's pooler mean of the two special tokens).
    dtype: computation dtype.
  """
  settings: ASTSettings
  cls_only: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, fbank: jax.Array) -> jax.Array:
    """Returns (B, N, D) with N = settings.num_tokens, or (B, 1, D) when ``cls_only``."""
    x = ASTEmbeddings(self.settings, self.dtype, name="embeddings")(fbank)
    for i in range(self.settings.num_layers):
      x = ASTLayer(self.settings, self.dtype, name=f"layer_{i}")(x)
    if self.cls_only:
      x = x[:, :1]  # LayerNorm is per token, so slicing first is exact and cheaper.
    return nn.LayerNorm(epsilon=self.settings.layer_norm_eps, dtype=self.dtype,
                        use_fast_variance=False, name="layernorm")(x)


def adapt_position_embeddings(pos: np.ndarray, frequency_patches: int, time_patches: int) -> np.ndarray:
  """Fits checkpoint position embeddings (1, 2 + F*T0, D) to T time patches (see module doc).

  Args:
    pos: the checkpoint's embeddings, CLS and distillation first, then the frequency-major grid.
    frequency_patches: F, unchanged.
    time_patches: T, the new number of time columns.

  Returns:
    (1, 2 + F*T, D): special tokens unchanged; the grid cropped to its first T columns
    when T <= T0, linearly interpolated along time (half-pixel centres) when T > T0.
  """
  d = pos.shape[-1]
  t0 = (pos.shape[1] - 2) // frequency_patches
  if pos.ndim != 3 or pos.shape[0] != 1 or 2 + frequency_patches * t0 != pos.shape[1]:
    raise hf.BackboneLoadError(f"position embeddings of shape {pos.shape} do not hold 2 + "
                             f"{frequency_patches} x T patch positions")
  grid = pos[0, 2:].reshape(frequency_patches, t0, d)
  if time_patches <= t0:
    grid = grid[:, :time_patches]
  else:
    src = np.maximum((np.arange(time_patches) + 0.5) * (t0 / time_patches) - 0.5, 0.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, t0 - 1)
    w = (src - lo).astype(pos.dtype)[None, :, None]
    grid = grid[:, lo] * (1 - w) + grid[:, hi] * w
  return np.concatenate([pos[:, :2], grid.reshape(1, -1, d).astype(pos.dtype)], axis=1)


def _layout(s: ASTSettings) -> list[tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]]:
  """(flax path, accepted on-disk keys, on-disk shape) for every AST weight."""
  d, m, p = s.hidden_size, s.intermediate_size, s.patch_size
  n0 = 2 + s.frequency_patches * s.checkpoint_time_patches
  out = [
      (("embeddings", "cls_token"), ("embeddings.cls_token",), (1, 1, d)),
      (("embeddings", "distillation_token"), ("embeddings.distillation_token",), (1, 1, d)),
      (("embeddings", "position_embeddings"), ("embeddings.position_embeddings",), (1, n0, d)),
      (("embeddings", "patch", "kernel"), ("embeddings.patch_embeddings.projection.weight",), (d, 1, p, p)),
      (("embeddings", "patch", "bias"), ("embeddings.patch_embeddings.projection.bias",), (d,)),
      (("layernorm", "scale"), ("layernorm.weight",), (d,)),
      (("layernorm", "bias"), ("layernorm.bias",), (d,)),
  ]
  # flax name: (legacy on-disk name, transformers-5 in-memory name, out features, in features)
  dense = {"query": ("attention.attention.query", "attention.q_proj", d, d),
           "key": ("attention.attention.key", "attention.k_proj", d, d),
           "value": ("attention.attention.value", "attention.v_proj", d, d),
           "attention_output": ("attention.output.dense", "attention.o_proj", d, d),
           "fc1": ("intermediate.dense", "mlp.fc1", m, d),
           "fc2": ("output.dense", "mlp.fc2", d, m)}
  for i in range(s.num_layers):
    old, new = f"encoder.layer.{i}.", f"layers.{i}."
    for ln in ("layernorm_before", "layernorm_after"):
      out.append(((f"layer_{i}", ln, "scale"), (old + ln + ".weight", new + ln + ".weight"), (d,)))
      out.append(((f"layer_{i}", ln, "bias"), (old + ln + ".bias", new + ln + ".bias"), (d,)))
    for name, (a, b, o, n) in dense.items():
      out.append(((f"layer_{i}", name, "kernel"), (old + a + ".weight", new + b + ".weight"), (o, n)))
      if s.qkv_bias or name in ("attention_output", "fc1", "fc2"):
        out.append(((f"layer_{i}", name, "bias"), (old + a + ".bias", new + b + ".bias"), (o,)))
  return out


def convert_hf_tensors(tensors: Mapping[str, np.ndarray], settings: ASTSettings,
                       where: str = "checkpoint") -> dict[str, Any]:
  """Maps HF AST tensors (either layout) to this module's params pytree, as float32 numpy.

  Raises:
    hf.BackboneLoadError: a key is missing, has the wrong shape, or is not accounted for.
  """
  if any(k.startswith(BASE_PREFIX) for k in tensors):
    tensors = hf.strip_prefix(tensors, BASE_PREFIX)  # ASTForAudioClassification: drop the classifier
  params: dict[str, Any] = {}
  used = []
  for path, keys, shape in _layout(settings):
    key, value = hf.take(tensors, keys, shape, where)
    used.append(key)
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T  # torch (O,I,kh,kw) / (O,I)
    elif path[-1] == "position_embeddings":
      value = adapt_position_embeddings(value, settings.frequency_patches, settings.time_patches)
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(value)
  hf.check_all_used(tensors, used, where)
  return params


def load_ast(model_dir: str | Path, *, max_length: Optional[int] = None, dtype: Any = jnp.float32,
             cls_only: bool = False) -> tuple[ASTModule, Params, ASTSettings]:
  """Loads an AST from a local HF directory (``config.json`` + ``model.safetensors``).

  Args:
    model_dir: an ``ASTModel`` or ``ASTForAudioClassification`` directory, e.g. the real
      ``MIT/ast-finetuned-audioset-10-10-0.4593`` or one written by ``write_tiny_ast``.
    max_length: fbank frames per clip; None = the checkpoint's. Other values adapt the
      position embeddings (crop when shorter, interpolate when longer; module doc).
    dtype: computation and params dtype.
    cls_only: the module returns token 0 only, (B, 1, D).

  Returns:
    (module, params, settings): ``module.apply({"params": params}, fbank)`` maps
    fbank (B, max_length, num_mel_bins) to (B, settings.num_tokens, hidden_size).

  Raises:
    hf.BackboneLoadError: (or its BackboneNotFoundError) naming the directory, file or key.
  """
  root = hf.resolve_dir(model_dir)
  config = hf.read_config(root)
  model_type = config.get("model_type", MODEL_TYPE)
  if model_type != MODEL_TYPE:
    raise hf.BackboneLoadError(f"{root / hf.CONFIG_NAME}: model_type '{model_type}' is not an AST "
                             f"('{MODEL_TYPE}')")
  settings = ASTSettings.from_hf_config(config, max_length, where=str(root / hf.CONFIG_NAME))
  tensors = hf.read_safetensors(root)
  params = convert_hf_tensors(tensors, settings, where=str(root))
  module = ASTModule(settings, cls_only=cls_only, dtype=dtype)
  # The converted tree must be exactly what the module declares (cheap: shapes only).
  expected = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, settings.max_length, settings.num_mel_bins),
                                                 jnp.float32))["params"]
  got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), params)
  want = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), expected)
  if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
    raise AssertionError(f"AST params tree does not match the module: {got} vs {want}")
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  return module, params, settings


def make_ast_encoder(module: ASTModule, params: Params) -> Callable[[jax.Array], jax.Array]:
  """Returns ``encode(fbank (B, T, F)) -> (B, N, D)``, jitted once per input shape.

  Params are a traced argument, not constants baked into the program (86 M floats for the
  real model would bloat compilation). The shape is checked before tracing so a wrong
  input fails with a message, not an XLA error. ``encode.jitted`` is the underlying
  ``jax.jit`` function (tests count its compilations).
  """
  s = module.settings
  jitted = jax.jit(lambda p, x: module.apply({"params": p}, x))

  def encode(fbank: jax.Array) -> jax.Array:
    if fbank.ndim != 3 or fbank.shape[1:] != (s.max_length, s.num_mel_bins):
      raise ValueError(f"AST input must be (batch, {s.max_length}, {s.num_mel_bins}) fbank frames, "
                       f"got {tuple(fbank.shape)}")
    return jitted(params, fbank)

  encode.jitted = jitted  # type: ignore[attr-defined]
  return encode
