"""FLUX rendering with torch diffusers from predicted (T5, CLIP) conditioning embeddings.

Why torch: there is no Flax FLUX, and FLUX is only ever run for evaluation images, outside
the differentiated code; arrays cross the boundary as numpy (or via dlpack from JAX).

The branch mapping is the one the heads are trained for:
``prompt_embeds`` = the **t5** branch (B, L, d_t5) and ``pooled_prompt_embeds`` = the **clip**
branch (B, d_clip). The reference's offline renderer swapped them; here both widths are
checked against the transformer's ``joint_attention_dim`` / ``pooled_projection_dim`` before
the call, so a swap is an error naming the branch, never a silent garbage image.

Typical use from a training loop::

  flux = load_flux("checkpoints/backbones/tiny_flux_t32_c32")
  images = flux.render(t5=t5_out, clip=clip_out, seeds=range(n), num_inference_steps=1)
  # (N, H, W, 3) float32 in [0, 1]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)


def _as_torch(x: Any, device, dtype):
  """numpy / JAX / torch array -> torch tensor on device (JAX arrays via dlpack, no copy on CPU)."""
  import torch
  if isinstance(x, torch.Tensor):
    t = x
  elif isinstance(x, np.ndarray):
    t = torch.from_numpy(np.ascontiguousarray(x))
  else:  # jax.Array and other dlpack producers
    try:
      t = torch.from_dlpack(x)
    except (TypeError, RuntimeError, AttributeError):
      t = torch.from_numpy(np.array(x))
  return t.to(device=device, dtype=dtype)


def default_dtype(device: str):
  """bfloat16 on CUDA devices that support it (FLUX.1 is trained in bf16), float32 elsewhere."""
  import torch
  if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
    return torch.bfloat16
  return torch.float32


def resolve_device(device: Optional[str]) -> str:
  """None / "auto" -> "cuda" when available, else "cpu"; anything else is kept."""
  import torch
  if device in (None, "", "auto"):
    return "cuda" if torch.cuda.is_available() else "cpu"
  return device


class FluxTorch:
  """A torch FluxPipeline without its text encoders, fed with predicted embeddings.

  Attributes:
    pipe: the diffusers FluxPipeline (text encoders/tokenizers are None).
    device, dtype: torch device string and dtype.
    t5_dim: ``joint_attention_dim``, the width the t5 branch must have.
    clip_dim: ``pooled_projection_dim``, the width the clip branch must have.
    sample_size: default image side (the VAE's sample_size).
  """

  def __init__(self, pipe, device: str, dtype):
    self.pipe, self.device, self.dtype = pipe, device, dtype
    cfg = pipe.transformer.config
    self.t5_dim = int(cfg.joint_attention_dim)
    self.clip_dim = int(cfg.pooled_projection_dim)
    self.sample_size = int(getattr(pipe.vae.config, "sample_size", 1024) or 1024)

  def check(self, t5_shape: Sequence[int], clip_shape: Sequence[int]) -> None:
    """Raises ValueError unless t5 is (B, L, t5_dim) and clip is (B, clip_dim)."""
    t5_shape, clip_shape = tuple(t5_shape), tuple(clip_shape)
    swapped = len(t5_shape) == 2 and len(clip_shape) == 3
    hint = " -- were the t5 and clip branches swapped?" if swapped else ""
    if len(t5_shape) != 3 or t5_shape[-1] != self.t5_dim:
      raise ValueError(f"t5 branch (prompt_embeds) must be (B, L, {self.t5_dim}), got {t5_shape}{hint}")
    if len(clip_shape) != 2 or clip_shape[-1] != self.clip_dim:
      raise ValueError(f"clip branch (pooled_prompt_embeds) must be (B, {self.clip_dim}), got "
                       f"{clip_shape}{hint}")
    if t5_shape[0] != clip_shape[0]:
      raise ValueError(f"t5 has {t5_shape[0]} rows but clip has {clip_shape[0]}")

  def __call__(self, t5, clip, *, seeds: Sequence[int], num_inference_steps: int = 1,
               guidance_scale: float = 0.0, height: Optional[int] = None,
               width: Optional[int] = None) -> np.ndarray:
    """Renders one batch.

    Args:
      t5: (B, L, d_t5) -> ``prompt_embeds``.
      clip: (B, d_clip) -> ``pooled_prompt_embeds``.
      seeds: B ints; each image's latents come from its own CPU generator, so an image does
        not depend on the batch it is rendered in.
      num_inference_steps: 1-4 for FLUX.1-schnell (1 in the reference's evaluation).
      guidance_scale: used by guidance-distilled FLUX.1-dev, ignored by schnell.
      height, width: image size (default: the model's native size).

    Returns:
      (B, H, W, 3) float32 numpy images in [0, 1].
    """
    import torch
    self.check(np.shape(t5), np.shape(clip))
    seeds = list(seeds)
    if len(seeds) != np.shape(t5)[0]:
      raise ValueError(f"got {len(seeds)} seeds for {np.shape(t5)[0]} samples")
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
      out = self.pipe(
          prompt_embeds=_as_torch(t5, self.device, self.dtype),
          pooled_prompt_embeds=_as_torch(clip, self.device, self.dtype),
          num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
          height=height or self.sample_size, width=width or self.sample_size,
          generator=gens, output_type="np")
    return np.asarray(out.images, dtype=np.float32)

  def render(self, t5, clip, *, seeds: Sequence[int], batch_size: int = 1, **kwargs) -> np.ndarray:
    """Renders N images in batches of ``batch_size`` (same arguments as ``__call__``)."""
    n = np.shape(t5)[0]
    seeds = list(seeds)
    out = [self(t5[s:s + batch_size], clip[s:s + batch_size], seeds=seeds[s:s + batch_size], **kwargs)
           for s in range(0, n, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.float32)

  def clear_cache(self) -> None:
    """Frees cached accelerator memory between batches (no-op on CPU)."""
    import gc
    import torch
    gc.collect()
    if str(self.device).startswith("cuda"):
      torch.cuda.empty_cache()


def load_flux(model_dir: str | Path, *, device: Optional[str] = None, dtype: Any = None) -> FluxTorch:
  """Loads a local diffusers FLUX directory without its text encoders.

  The T5-XXL encoder alone is ~9.5 GB in bf16; the heads already predict its output, so it
  is never loaded (nor CLIP-L).

  Args:
    model_dir: diffusers layout with ``transformer/``, ``vae/``, ``scheduler/``.
    device: "cpu", "cuda", "cuda:1", ... or None/"auto".
    dtype: torch dtype; default bf16 on CUDA with bf16 support, else float32.

  Returns:
    A FluxTorch renderer.
  """
  import diffusers
  from diffusers import FluxPipeline
  model_dir = Path(model_dir)
  for sub in ("transformer", "vae", "scheduler"):
    if not (model_dir / sub).is_dir():
      raise FileNotFoundError(f"{model_dir} is not a diffusers FLUX directory: no {sub}/")
  device = resolve_device(device)
  dtype = dtype or default_dtype(device)
  diffusers.utils.logging.set_verbosity_error()
  diffusers.utils.logging.disable_progress_bar()
  pipe = FluxPipeline.from_pretrained(
      model_dir, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
      torch_dtype=dtype, local_files_only=True)
  pipe.to(device)
  pipe.vae.enable_slicing()  # decode a batch image by image: the VAE is the 1024^2 memory peak
  pipe.set_progress_bar_config(disable=True)
  return FluxTorch(pipe, device, dtype)
