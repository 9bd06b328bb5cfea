"""Stable Diffusion rendering in Flax from predicted ``prompt_embeds`` (our own jitted sampler).

Why our own sampler: with transformers 5 ``FlaxStableDiffusionPipeline`` is a dummy object,
and it never accepted ``prompt_embeds`` anyway (it always runs its CLIP text encoder on
token ids). What the federated heads predict *is* the text encoder's output, so the sampler
starts from there: UNet + VAE + scheduler from diffusers' Flax classes, weights converted
from the torch safetensors of a local diffusers-layout directory, and one ``jax.jit``-ed
function per (steps, guidance on/off, batch shape) running the whole denoising loop in a
``lax.fori_loop`` followed by the VAE decode.

It mirrors ``diffusers.StableDiffusionPipeline.__call__`` step for step (latents scaled by
``init_noise_sigma``, negative embeddings first in the CFG batch, ``scale_model_input``,
``scheduler.step``, decode of ``latents / scaling_factor``, ``(x / 2 + 0.5).clip(0, 1)``),
so, with the same weights, scheduler and initial latents, images match the torch pipeline
(see tests/test_render.py for the tolerance).

Typical use from a training loop::

  sd = load_sd_flax(paths.backbone_dir(cfg, "sd"), scheduler="ddim")  # once
  neg = empty_prompt_embeds(model_dir, sd.cross_attention_dim)        # once: CLIP("") or zeros
  images = sd.render(clip_seq, neg, seeds=range(len(clip_seq)), num_inference_steps=2,
                     guidance_scale=7.5, batch_size=8)  # (N, H, W, 3) float32 in [0, 1]

SD 1.x / 2.x UNets only: SDXL's extra (text_time) conditioning is not fed.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "pndm", "euler")
_SCHEDULER_BY_TORCH_NAME = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm",
                            "EulerDiscreteScheduler": "euler"}


def _quiet_diffusers_import():
  """Imports diffusers' Flax classes, silencing their deprecation banner (they are pinned)."""
  import diffusers
  diffusers.utils.logging.set_verbosity_error()
  from diffusers import (FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxEulerDiscreteScheduler,
                         FlaxPNDMScheduler, FlaxUNet2DConditionModel)
  return (FlaxUNet2DConditionModel, FlaxAutoencoderKL,
          {"ddim": FlaxDDIMScheduler, "pndm": FlaxPNDMScheduler, "euler": FlaxEulerDiscreteScheduler})


def read_torch_state_dict(component_dir: str | Path) -> dict[str, np.ndarray]:
  """Reads a diffusers component's torch weights as numpy, without unpickling objects.

  Prefers ``diffusion_pytorch_model.safetensors``; falls back to the ``.bin`` file, read with
  ``torch.load(weights_only=True)``. bfloat16 tensors are widened to float32 (numpy has no
  native bf16); the caller casts to the compute dtype.
  """
  d = Path(component_dir)
  st = d / "diffusion_pytorch_model.safetensors"
  if not st.is_file():
    cands = sorted(d.glob("*.safetensors"))
    st = cands[0] if len(cands) == 1 else st
  if st.is_file():
    from safetensors import safe_open
    out = {}
    with safe_open(str(st), framework="pt") as f:
      for k in f.keys():
        t = f.get_tensor(k)
        out[k] = (t.float() if t.dtype == _torch().bfloat16 else t).numpy()
    return out
  bin_path = d / "diffusion_pytorch_model.bin"
  if bin_path.is_file():
    sd = _torch().load(bin_path, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.dtype == _torch().bfloat16 else v).numpy() for k, v in sd.items()}
  raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors or .bin in {d}")


def _torch():
  import torch
  return torch


def torch_to_flax_params(pt_state: dict[str, np.ndarray], flax_model, *, where: str = "") -> Any:
  """Maps a torch state dict onto a Flax model's parameter tree.

  Same renaming as diffusers' ``convert_pytorch_state_dict_to_flax`` but the target tree
  comes from ``jax.eval_shape(flax_model.init_weights, key)``: no real initialisation
  (25-40 s for even a tiny UNet on CPU), and every expected leaf must be present with the
  right shape, so a wrong checkpoint is an error rather than silently random weights.

  Args:
    pt_state: torch parameter name -> numpy array.
    flax_model: a diffusers Flax model (``FlaxUNet2DConditionModel``, ``FlaxAutoencoderKL``).
    where: name used in error messages.

  Returns:
    The Flax params pytree (numpy leaves).
  """
  from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor
  from flax.traverse_util import flatten_dict, unflatten_dict
  shapes = flatten_dict(jax.eval_shape(flax_model.init_weights, jax.random.PRNGKey(0)))
  out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected = []
  for pt_key, tensor in pt_state.items():
    key = tuple(rename_key(pt_key).split("."))
    fkey, ftensor = rename_key_and_reshape_tensor(key, tensor, shapes)
    if fkey not in shapes:
      unexpected.append(pt_key)
      continue
    if tuple(ftensor.shape) != tuple(shapes[fkey].shape):
      raise ValueError(f"{where}: weight {pt_key} has shape {ftensor.shape}, the Flax model "
                       f"expects {shapes[fkey].shape} at {'/'.join(fkey)}")
    out[fkey] = np.asarray(ftensor)
  missing = [k for k in shapes if k not in out]
  if missing or unexpected:
    raise KeyError(f"{where}: torch -> Flax weight mismatch: {len(missing)} missing "
                   f"(e.g. {['/'.join(k) for k in missing[:3]]}), {len(unexpected)} unexpected "
                   f"(e.g. {unexpected[:3]})")
  return unflatten_dict(out)


def _load_component(cls, component_dir: Path, dtype) -> tuple[Any, Any]:
  """Builds a Flax module from a torch config.json and converts its weights.

  When the raw safetensors keys do not line up (legacy checkpoints, e.g. old VAE attention
  names), the torch model is loaded through diffusers, which renames legacy keys, and its
  ``state_dict()`` is converted instead.
  """
  config = json.loads((component_dir / "config.json").read_text())
  if config.get("addition_embed_type"):
    raise ValueError(f"{component_dir}: addition_embed_type={config['addition_embed_type']!r} "
                     "(SDXL-style) needs added conditioning this sampler does not provide")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = cls.from_config(config, dtype=dtype)
  try:
    params = torch_to_flax_params(read_torch_state_dict(component_dir), model, where=str(component_dir))
  except KeyError:
    import diffusers
    torch_cls = getattr(diffusers, cls.__name__.removeprefix("Flax"))
    tmodel = torch_cls.from_pretrained(component_dir, local_files_only=True)
    state = {k: v.float().numpy() for k, v in tmodel.state_dict().items()}
    del tmodel
    params = torch_to_flax_params(state, model, where=str(component_dir))
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype if np.issubdtype(x.dtype, np.floating) else x.dtype),
                        params)
  return model, params


class SDFlax:
  """A Flax Stable Diffusion renderer: modules, converted params and a jitted sampler.

  Attributes:
    unet, vae: the diffusers Flax modules.
    params: ``{"unet": ..., "vae": ...}`` on the chosen device.
    scheduler: the diffusers Flax scheduler; ``scheduler_name`` one of SCHEDULERS.
    cross_attention_dim: width d of the (B, 77, d) prompt embeddings the UNet expects.
    vae_scale_factor: image side / latent side.
    sample_size: default image side (UNet sample size x vae_scale_factor).
  """

  def __init__(self, unet, unet_params, vae, vae_params, scheduler, scheduler_name: str,
               device: Optional[jax.Device] = None, decode_batch_size: Optional[int] = None):
    self.unet, self.vae, self.scheduler = unet, vae, scheduler
    self.decode_batch_size = decode_batch_size
    self.scheduler_name = scheduler_name
    params = {"unet": unet_params, "vae": vae_params}
    self.params = jax.device_put(params, device) if device is not None else params
    self.device = device
    self.cross_attention_dim = int(unet.cross_attention_dim)
    self.latent_channels = int(unet.in_channels)
    self.vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)
    self.sample_size = int(unet.sample_size) * self.vae_scale_factor
    self.dtype = unet.dtype
    self._sched_state = scheduler.create_state()
    self._sample = jax.jit(self._sample_impl, static_argnames=("num_inference_steps", "do_cfg"))

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of the latents for an image of the given size."""
    f = self.vae_scale_factor
    if height % f or width % f:
      raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    return (self.latent_channels, height // f, width // f)

  def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> jax.Array:
    """Standard-normal latents (B, C, h, w), one independent draw per seed.

    Sample i depends only on ``seeds[i]``, so an image does not change with the batch size
    or with its position in a batch.
    """
    shape = self.latent_shape(height, width)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(list(seeds), jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)

  def _sample_impl(self, params, prompt_embeds, negative_prompt_embeds, latents, guidance_scale,
                   *, num_inference_steps: int, do_cfg: bool):
    """The whole denoising loop + VAE decode; returns (B, H, W, 3) float32 in [0, 1]."""
    sched = self.scheduler
    state = sched.set_timesteps(self._sched_state, num_inference_steps, latents.shape)
    latents = latents * state.init_noise_sigma
    context = prompt_embeds.astype(self.dtype)
    if do_cfg:
      context = jnp.concatenate([negative_prompt_embeds.astype(self.dtype), context])

    def body(i, carry):
      latents, state = carry
      t = state.timesteps[i]
      x = jnp.concatenate([latents] * 2) if do_cfg else latents
      x = sched.scale_model_input(state, x, t)
      ts = jnp.broadcast_to(t, (x.shape[0],))
      eps = self.unet.apply({"params": params["unet"]}, x.astype(self.dtype), ts, context).sample
      eps = eps.astype(jnp.float32)
      if do_cfg:
        uncond, cond = jnp.split(eps, 2)
        eps = uncond + guidance_scale * (cond - uncond)
      latents, state = sched.step(state, eps, t, latents).to_tuple()
      return latents, state

    latents, _ = jax.lax.fori_loop(0, state.timesteps.shape[0], body, (latents, state))
    z = jnp.transpose(latents / self.vae.scaling_factor, (0, 2, 3, 1)).astype(self.dtype)

    def decode(z):
      return self.vae.apply({"params": params["vae"]}, z, method=self.vae.decode).sample

    if self.decode_batch_size and self.decode_batch_size < z.shape[0]:
      # The VAE decoder, not the UNet, is the activation peak at 512^2: decode in slices.
      image = jax.lax.map(lambda zi: decode(zi[None])[0], z, batch_size=self.decode_batch_size)
    else:
      image = decode(z)
    image = jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.transpose(image, (0, 2, 3, 1))

  def sample(self, prompt_embeds, negative_prompt_embeds, latents, *, num_inference_steps: int,
             guidance_scale: float) -> jax.Array:
    """Denoises one batch (jitted; compiled once per steps / CFG / shapes).

    Args:
      prompt_embeds: (B, 77, d) conditioning tokens (the clip branch's SD output).
      negative_prompt_embeds: (B, 77, d) or (1, 77, d) unconditional embeddings (the CLIP
        encoding of the empty prompt for a real SD; passed in because we hold no text encoder).
      latents: (B, C, h, w) initial noise (see ``initial_latents``), before init_noise_sigma.
      num_inference_steps: denoising steps (PNDM runs one more UNet call, as in diffusers).
      guidance_scale: CFG scale; <= 1 disables CFG (one UNet call per step), as in diffusers.

    Returns:
      Images (B, H, W, 3) float32 in [0, 1].
    """
    prompt_embeds = jnp.asarray(prompt_embeds)
    b = prompt_embeds.shape[0]
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.cross_attention_dim:
      raise ValueError(f"prompt_embeds must be (B, L, {self.cross_attention_dim}), got "
                       f"{tuple(prompt_embeds.shape)}")
    neg = jnp.asarray(negative_prompt_embeds)
    if neg.shape[0] == 1 and b != 1:
      neg = jnp.broadcast_to(neg, (b,) + neg.shape[1:])
    if neg.shape != prompt_embeds.shape:
      raise ValueError(f"negative_prompt_embeds {tuple(neg.shape)} do not match prompt_embeds "
                       f"{tuple(prompt_embeds.shape)}")
    do_cfg = float(guidance_scale) > 1.0
    return self._sample(self.params, prompt_embeds, neg, jnp.asarray(latents, jnp.float32),
                        jnp.float32(guidance_scale), num_inference_steps=int(num_inference_steps),
                        do_cfg=do_cfg)

  def render(self, prompt_embeds: np.ndarray, negative_prompt_embeds: np.ndarray, *,
             seeds: Sequence[int], num_inference_steps: int, guidance_scale: float,
             height: Optional[int] = None, width: Optional[int] = None,
             batch_size: int = 4) -> np.ndarray:
    """Renders N images in fixed-size batches (the last one padded, so one compile serves all).

    Args:
      prompt_embeds: (N, 77, d).
      negative_prompt_embeds: (1, 77, d) or (N, 77, d).
      seeds: N ints; image i's initial latents come from ``seeds[i]`` only.
      num_inference_steps, guidance_scale: see ``sample``.
      height, width: image size (default: the model's native size).
      batch_size: images per jitted call.

    Returns:
      (N, H, W, 3) float32 numpy images in [0, 1].
    """
    height = height or self.sample_size
    width = width or self.sample_size
    # jax arrays (straight from the heads) stay on device; anything else becomes numpy.
    prompt_embeds = prompt_embeds if isinstance(prompt_embeds, jax.Array) else np.asarray(prompt_embeds)
    neg = (negative_prompt_embeds if isinstance(negative_prompt_embeds, jax.Array)
           else np.asarray(negative_prompt_embeds))
    seeds = list(seeds)
    n = prompt_embeds.shape[0]
    if len(seeds) != n:
      raise ValueError(f"got {len(seeds)} seeds for {n} prompt embeddings")
    if neg.shape[0] not in (1, n):
      raise ValueError(f"negative_prompt_embeds must have 1 or {n} rows, got {neg.shape[0]}")
    out = []
    for start in range(0, n, batch_size):
      idx = list(range(start, min(start + batch_size, n)))
      pad = batch_size - len(idx)
      take = np.asarray(idx + [idx[-1]] * pad)
      lat = self.initial_latents([seeds[i] for i in take.tolist()], height, width)
      neg_b = neg if neg.shape[0] == 1 else neg[take]
      img = self.sample(prompt_embeds[take], neg_b, lat, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale)
      out.append(np.asarray(img)[:len(idx)])
    return np.concatenate(out) if out else np.zeros((0, height, width, 3), np.float32)


def resolve_device(device: Optional[str]) -> Optional[jax.Device]:
  """"cpu", "gpu", "cuda:1", "tpu:0" or None/"auto" (JAX's default) -> a jax.Device."""
  if device in (None, "", "auto"):
    return None
  platform, _, index = device.partition(":")
  platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
  devices = jax.devices(platform)
  i = int(index) if index else 0
  if i >= len(devices):
    raise ValueError(f"device {device!r}: only {len(devices)} {platform} device(s)")
  return devices[i]


def load_sd_flax(model_dir: str | Path, *, scheduler: Optional[str] = None, dtype: Any = jnp.float32,
                 device: Optional[str] = None, decode_batch_size: Optional[int] = None) -> SDFlax:
  """Loads UNet + VAE + scheduler from a local diffusers-layout SD directory as Flax.

  Args:
    model_dir: directory with ``unet/``, ``vae/`` and ``scheduler/`` (torch weights, as
      ``StableDiffusionPipeline.save_pretrained`` writes them; a text encoder may be present
      and is ignored).
    scheduler: "ddim", "pndm" (always with ``skip_prk_steps``, as SD uses it) or "euler";
      None = the directory's own scheduler class. The directory's scheduler config (betas,
      steps_offset, ...) is used in every case.
    dtype: compute and parameter dtype (``jnp.bfloat16`` on accelerators halves memory).
    device: "cpu", "gpu", "cuda:0", ... or None for JAX's default device.
    decode_batch_size: VAE-decode this many images at a time inside the jitted call (None =
      the whole batch); 1-2 keeps SD-1.5's 512^2 decode peak small for large batches.

  Returns:
    An SDFlax renderer.
  """
  model_dir = Path(model_dir)
  for sub in ("unet", "vae", "scheduler"):
    if not (model_dir / sub).is_dir():
      raise FileNotFoundError(f"{model_dir} is not a diffusers Stable Diffusion directory: no {sub}/")
  unet_cls, vae_cls, sched_classes = _quiet_diffusers_import()
  sched_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
  name = scheduler or _SCHEDULER_BY_TORCH_NAME.get(sched_config.get("_class_name", ""), "")
  if name not in sched_classes:
    raise ValueError(f"unknown scheduler {scheduler or sched_config.get('_class_name')!r}; "
                     f"choose one of {SCHEDULERS}")
  overrides = {"skip_prk_steps": True} if name == "pndm" else {}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sched = sched_classes[name].from_config({**sched_config, **overrides})
  unet, unet_params = _load_component(unet_cls, model_dir / "unet", dtype)
  vae, vae_params = _load_component(vae_cls, model_dir / "vae", dtype)
  return SDFlax(unet, unet_params, vae, vae_params, sched, name, device=resolve_device(device),
                decode_batch_size=decode_batch_size)


def empty_prompt_embeds(model_dir: str | Path, cross_attention_dim: int, length: int = 77) -> np.ndarray:
  """The unconditional (negative) embeddings for CFG: CLIP("") when the dir has a text encoder.

  A real SD directory carries ``text_encoder/`` + ``tokenizer/``; SD's own CFG uses the
  encoding of the empty prompt padded to 77 tokens, computed here once with torch. The tiny
  test models have no text side: zeros (1, length, d) are returned and a warning is logged.
  """
  model_dir = Path(model_dir)
  if (model_dir / "text_encoder").is_dir() and (model_dir / "tokenizer").is_dir():
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    enc = CLIPTextModel.from_pretrained(model_dir / "text_encoder", local_files_only=True)
    ids = tok([""], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
      out = enc(ids.input_ids).last_hidden_state.float().numpy()
    if out.shape[-1] != cross_attention_dim:
      raise ValueError(f"{model_dir}/text_encoder gives width {out.shape[-1]}, UNet expects "
                       f"{cross_attention_dim}")
    return out
  log.warning("%s has no text_encoder/tokenizer: using zero negative prompt embeddings for CFG",
              model_dir)
  return np.zeros((1, length, cross_attention_dim), np.float32)
