"""Tiny random-initialised diffusion backbones and CLIP scorer, written offline in diffusers layout.

Why: no weights can be downloaded on the project machine, yet the renderers, the offline
rendering CLI and the CLIP zero-shot metric must run end to end in tests. These writers
produce directories with exactly the layout of the real checkpoints
(``runwayml/stable-diffusion-v1-5``, ``black-forest-labs/FLUX.1-schnell``,
``openai/clip-vit-base-patch32``), so the same loading code serves both.

Every writer is deterministic (``seed``), atomic (written to a temporary sibling directory,
then renamed, so a crash never leaves a half-written model that looks complete) and
idempotent (a complete directory with the same spec is left alone; a tiny model with another
spec is replaced; any other directory is refused). The spec is recorded in ``a2v_tiny.json``,
the marker shared with the tiny text and AST writers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from a2v_jax.backbones.tiny_text import MARKER, write_once  # same marker and atomic write as the text writers

# Scheduler config shared by DDIM / PNDM / Euler, as in SD-1.5's scheduler_config.json.
SD_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
    prediction_type="epsilon", timestep_spacing="leading")


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
  """Builds a torch module under a fixed seed without disturbing the caller's global RNG."""
  import torch
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(seed)
    module = make()
  return module.eval()


def tiny_sd_unet_config(cross_attention_dim: int) -> dict[str, Any]:
  """UNet2DConditionModel kwargs: 2 blocks of 32/64 channels, latent 16x16 (images 32x32)."""
  return dict(
      sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
      attention_head_dim=8, norm_num_groups=32)


def tiny_sd_vae_config() -> dict[str, Any]:
  """AutoencoderKL kwargs: 2 blocks, so latents are images / 2 (SD-1.5 uses 4 blocks, / 8)."""
  return dict(
      in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
      up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
      norm_num_groups=32, sample_size=32, scaling_factor=0.18215)


def write_tiny_sd(out_dir: str | Path, *, cross_attention_dim: int, seed: int = 0) -> Path:
  """Writes a tiny Stable Diffusion pipeline (UNet + VAE + DDIM scheduler), no text side.

  The layout is what ``StableDiffusionPipeline.save_pretrained`` writes, with text encoder,
  tokenizer, safety checker and feature extractor recorded as absent: the renderers work
  from predicted ``prompt_embeds`` and never tokenise text. The scheduler config carries
  ``skip_prk_steps`` and ``steps_offset=1`` so DDIM, PNDM and Euler can all be built from it.

  Args:
    out_dir: target directory (created; parents too).
    cross_attention_dim: width of the conditioning tokens, i.e. of the clip branch's
      (N, 77, d) output that the UNet attends to.
    seed: torch seed of the random initialisation.

  Returns:
    out_dir as a Path.
  """
  spec = {"kind": "sd", "seed": int(seed), "unet": tiny_sd_unet_config(int(cross_attention_dim)),
          "vae": tiny_sd_vae_config(), "scheduler": SD_SCHEDULER_CONFIG}

  def fill(tmp: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    unet = _seeded(seed, lambda: UNet2DConditionModel(**tiny_sd_unet_config(cross_attention_dim)))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**tiny_sd_vae_config()))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet,
        scheduler=DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp)

  return write_once(Path(out_dir), spec, fill)


def write_tiny_flux(out_dir: str | Path, *, joint_attention_dim: int, pooled_projection_dim: int,
                    seed: int = 0) -> Path:
  """Writes a tiny FLUX pipeline (transformer + VAE + flow-matching scheduler), no text side.

  Args:
    out_dir: target directory.
    joint_attention_dim: width of the T5 tokens (``prompt_embeds``, the t5 branch).
    pooled_projection_dim: width of the pooled CLIP vector (``pooled_prompt_embeds``, the
      clip branch). Choosing it different from ``joint_attention_dim`` makes a swapped call
      fail loudly instead of rendering garbage (the reference swapped them).
    seed: torch seed of the random initialisation.

  Returns:
    out_dir as a Path.
  """
  spec = {"kind": "flux", "joint_attention_dim": int(joint_attention_dim),
          "pooled_projection_dim": int(pooled_projection_dim), "seed": int(seed)}

  def fill(tmp: Path) -> None:
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim, axes_dims_rope=[4, 4, 8]))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035, sample_size=32))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.save_pretrained(tmp)

  return write_once(Path(out_dir), spec, fill)


def write_tiny_clip_model(out_dir: str | Path, *, seed: int = 0) -> Path:
  """Writes a tiny CLIPModel (text + vision towers) with tokenizer and processor.

  Stands in for ``openai/clip-vit-base-patch32`` in the image metric's tests: 32x32 images,
  patch 8, 32-wide towers, 16-d joint space, and the real CLIP tokenizer (vendored BPE,
  ``a2v_jax.backbones.tokenizers``).

  Args:
    out_dir: target directory.
    seed: torch seed of the random initialisation.

  Returns:
    out_dir as a Path.
  """
  spec = {"kind": "clip", "seed": int(seed)}

  def fill(tmp: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip import CLIPImageProcessorPil
    from a2v_jax.backbones.tokenizers import clip_tokenizer
    tok = clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    model = _seeded(seed, lambda: CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)))
    model.save_pretrained(tmp)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                            crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(tmp)

  return write_once(Path(out_dir), spec, fill)
