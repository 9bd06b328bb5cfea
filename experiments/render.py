"""python -m experiments.render --checkpoint_dir checkpoints/embeddings --output_dir OUT [--diffusion_type sd]

Renders embeddings checkpoints (ours or the reference's .pt) to PNGs, per-class contact sheets
and a render_summary.json. Exit status: 0 all rendered, 2 stopped by an error (bad arguments,
no matching file, protected output dir, a bad file with --on_error stop, no file renderable (then no
render_summary.json is written), a full disk: one message, no traceback, as every CLI of the project), 3
finished but some files were skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys

from experiments.cli_errors import non_negative_float, non_negative_int, positive_int


def main(argv=None) -> int:
  from a2v_jax.config import OutputConfig
  out = OutputConfig()
  p = argparse.ArgumentParser(description="Render images from embeddings checkpoints (a2v-jax).")
  src = p.add_argument_group("input (one of)")
  src.add_argument("--checkpoint", help="one embeddings file (.safetensors, or the reference's .pt)")
  src.add_argument("--checkpoint_dir", help="a folder of embeddings files")
  src.add_argument("--pattern", help="glob within --checkpoint_dir "
                   "(default: *_embeddings_r*.safetensors and *_embeddings_r*.pt)")
  p.add_argument("--output_dir", required=True, help="where PNGs, sheets and the summary go")
  p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --output_dir")
  p.add_argument("--diffusion_type", choices=("sd", "flux"), default="flux")
  p.add_argument("--model_dir", help="local diffusers directory (default: the tiny model under "
                 "--tiny_dir, written on first use)")
  p.add_argument("--tiny_dir", default=None,
                 help="folder of the tiny backbones (default: checkpoints/backbones)")
  p.add_argument("--scheduler", choices=("ddim", "pndm", "euler"), help="SD only (default: the model's)")
  p.add_argument("--batch_size", type=positive_int, default=1)
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                 help="auto: bfloat16 on accelerators, float32 on CPU")
  p.add_argument("--decode_batch_size", type=positive_int, default=None,
                 help="SD only: VAE-decode this many images at a time (default: the whole batch)")
  p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, gpu, ... (default: auto)")
  p.add_argument("--num_inference_steps", type=positive_int, default=out.num_inference_steps)
  p.add_argument("--guidance_scale", type=non_negative_float, default=out.guidance_scale)
  p.add_argument("--seed", type=non_negative_int, default=0, help="image i of a file uses seed + i")
  p.add_argument("--height", type=positive_int, default=None, help="default: the model's native size")
  p.add_argument("--width", type=positive_int, default=None, help="default: the model's native size")
  p.add_argument("--clear_cache_every", type=non_negative_int, default=0, help="free accelerator caches every N batches")
  p.add_argument("--on_error", choices=("skip", "stop"), default="skip",
                 help="what a missing/corrupt/mismatched file does")
  p.add_argument("--no_contact_sheets", action="store_true")
  p.add_argument("--clip_model_dir", help="score images with CLIP zero-shot (local CLIPModel dir)")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--verbose", action="store_true")
  args = p.parse_args(argv)

  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  from a2v_jax.render import offline as render
  from experiments.cli_errors import guard
  return guard(lambda: _render(render, args),
               interrupted="the images written so far are kept; rerun with --overwrite to start again")


def _render(render, args: argparse.Namespace) -> int:
  """The render itself; RenderError (and the project's errors) end in ``guard``'s one message."""
  paths = render.find_checkpoints(args.checkpoint, args.checkpoint_dir, args.pattern)
  extra = {"tiny_dir": args.tiny_dir} if args.tiny_dir else {}
  opts = render.RenderOptions(
      output_dir=args.output_dir, diffusion_type=args.diffusion_type, model_dir=args.model_dir,
      batch_size=args.batch_size, dtype=args.dtype, decode_batch_size=args.decode_batch_size,
      device=args.device, num_inference_steps=args.num_inference_steps,
      guidance_scale=args.guidance_scale, seed=args.seed, height=args.height, width=args.width,
      scheduler=args.scheduler, overwrite=args.overwrite, on_error=args.on_error,
      clear_cache_every=args.clear_cache_every, contact_sheets=not args.no_contact_sheets,
      clip_model_dir=args.clip_model_dir, progress=not args.no_progress, verbose=args.verbose,
      **extra)
  summary = render.render_checkpoints(paths, opts)
  print(summary.text())
  return 3 if summary.skipped else 0


if __name__ == "__main__":
  sys.exit(main())
