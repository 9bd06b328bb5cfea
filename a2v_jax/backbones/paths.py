"""Where each frozen backbone lives: a local Hugging Face directory, or "tiny" (written offline here).

Tiny backbones are random-initialised, deterministic, and saved in the same layout as the real
checkpoints, so the default run and the tests go through exactly the loading code that real
weights use. ``python -m a2v_jax.backbones.paths`` writes them all ahead of time.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from a2v_jax.config import BackboneConfig, Config

KINDS = ("ast", "clip_text", "t5", "sd", "flux", "clip")
_FIELD = {"ast": "ast_model", "clip_text": "clip_text_model", "t5": "t5_model", "sd": "sd_model",
          "flux": "flux_model", "clip": "clip_vision_model"}


def _writers() -> dict[str, Callable[[Path], Path]]:
  # Imported lazily: each writer pulls in torch/transformers/diffusers.
  def ast(p):
    from a2v_jax.backbones.tiny_ast import write_tiny_ast
    return write_tiny_ast(p)

  def clip_text(p):
    from a2v_jax.backbones.tiny_text import write_tiny_clip_text
    return write_tiny_clip_text(p)

  def t5(p):
    from a2v_jax.backbones.tiny_text import write_tiny_t5
    return write_tiny_t5(p)

  def sd(p):
    from a2v_jax.backbones.tiny_diffusion import write_tiny_sd
    return write_tiny_sd(p, cross_attention_dim=TINY_CLIP_DIM)

  def flux(p):
    from a2v_jax.backbones.tiny_diffusion import write_tiny_flux
    return write_tiny_flux(p, joint_attention_dim=TINY_T5_DIM, pooled_projection_dim=TINY_CLIP_DIM)

  def clip(p):
    from a2v_jax.backbones.tiny_diffusion import write_tiny_clip_model
    return write_tiny_clip_model(p)

  return {"ast": ast, "clip_text": clip_text, "t5": t5, "sd": sd, "flux": flux, "clip": clip}


# Widths of the tiny text encoders, which the tiny SD/FLUX must accept as conditioning.
TINY_CLIP_DIM = 32
TINY_T5_DIM = 32


def backbone_dir(cfg: Config | BackboneConfig, kind: str, *, create: bool = True) -> Path:
  """The directory of backbone ``kind``; tiny ones are written on first use.

  Raises:
    FileNotFoundError: a configured real-weights directory does not exist.
  """
  b = cfg.backbones if isinstance(cfg, Config) else cfg
  if kind not in KINDS:
    raise ValueError(f"unknown backbone kind '{kind}'; known: {list(KINDS)}")
  value = getattr(b, _FIELD[kind])
  if value != "tiny":
    path = Path(value)
    if not path.is_dir():
      raise FileNotFoundError(
          f"backbone '{_FIELD[kind]}' points at {path}, which is not a directory (use \"tiny\" for "
          "the offline random backbones, or a local Hugging Face-layout folder)")
    return path
  path = Path(b.tiny_dir) / kind
  if create:
    _writers()[kind](path)
  return path


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description="Write the tiny offline backbones (deterministic).")
  p.add_argument("--dir", default=BackboneConfig().tiny_dir)
  p.add_argument("--kinds", default=",".join(KINDS))
  args = p.parse_args(argv)
  b = BackboneConfig(tiny_dir=args.dir)
  for kind in args.kinds.split(","):
    print(f"{kind}: {backbone_dir(b, kind)}")


if __name__ == "__main__":
  main()
