"""Offline rendering of embeddings checkpoints: PNG per sample, per-class contact sheets, a summary.

Why a library and not only a script (``experiments/render.py`` is the thin CLI): the same
code renders from a notebook or a job, and is tested end to end on tiny models. It replaces
the reference's ``generate_images_from_checkpoint.py`` and fixes what that got
wrong: the t5/clip branches go to ``prompt_embeds``/``pooled_prompt_embeds`` respectively
(never swapped), server files render too, batches are real batches, every image is seeded,
bad files are reported (and skipped or stop the run), and existing output is never silently
overwritten.

Layout written under ``output_dir``::

  {file stem}/{node}_r{round}_{class}_{sample_id}.png   one image per sample
  {file stem}/sheet_{class}.png                          per-class contact sheet
  render_summary.json                                    what was rendered / skipped, timings

Image i of a file uses seed ``seed + i`` for its initial noise, whatever the batch size, so
the same sample renders identically across runs, and sample i of every node/round starts
from the same noise (differences come from the embeddings only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
import traceback
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np

from a2v_jax.errors import A2VError
from a2v_jax.render import embeddings_io
from a2v_jax.config import BackboneConfig, OutputConfig

log = logging.getLogger(__name__)

DEFAULT_PATTERNS = ("*_embeddings_r*.safetensors", "*_embeddings_r*.pt")
SUMMARY_FILE = "render_summary.json"
_OUT = OutputConfig()


class RenderError(A2VError, RuntimeError):
  """A problem that stops rendering (bad arguments, no input, protected output, --on_error stop)."""


@dataclasses.dataclass(frozen=True)
class RenderOptions:
  """How to render (the CLI's options; defaults from ``OutputConfig`` where it has them)."""
  output_dir: str
  diffusion_type: Literal["sd", "flux"] = "flux"
  # None = the tiny model of that type under tiny_dir (written on first use).
  model_dir: Optional[str] = None
  tiny_dir: str = BackboneConfig().tiny_dir
  batch_size: int = 1
  # None/"auto": CUDA when present (torch FLUX) / JAX's default device (Flax SD).
  device: Optional[str] = None
  num_inference_steps: int = _OUT.num_inference_steps
  guidance_scale: float = _OUT.guidance_scale
  seed: int = 0
  # None = the model's native size (32 for the tiny models, 512 SD-1.5, 1024 FLUX.1).
  height: Optional[int] = None
  width: Optional[int] = None
  # SD only: "ddim", "pndm", "euler"; None = the model directory's scheduler.
  scheduler: Optional[str] = None
  # "auto": bfloat16 on accelerators, float32 on CPU; or "float32" / "bfloat16" / "float16".
  dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
  # SD only: VAE-decode this many images at a time (None = the whole batch).
  decode_batch_size: Optional[int] = None
  overwrite: bool = False
  on_error: Literal["skip", "stop"] = "skip"
  # Free accelerator caches every this many batches (0 = never).
  clear_cache_every: int = 0
  contact_sheets: bool = True
  # Optional CLIP zero-shot scoring of the rendered images (a local CLIPModel directory).
  clip_model_dir: Optional[str] = None
  progress: bool = True
  verbose: bool = False

  def __post_init__(self):
    if self.diffusion_type not in ("sd", "flux"):
      raise RenderError(f"diffusion_type must be 'sd' or 'flux', got {self.diffusion_type!r}")
    if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
      raise RenderError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
    if self.on_error not in ("skip", "stop"):
      raise RenderError(f"on_error must be 'skip' or 'stop', got {self.on_error!r}")
    for key in ("batch_size", "num_inference_steps"):
      if getattr(self, key) < 1:
        raise RenderError(f"{key} must be >= 1, got {getattr(self, key)}")
    if self.clear_cache_every < 0:
      raise RenderError(f"clear_cache_every must be >= 0, got {self.clear_cache_every}")


@dataclasses.dataclass
class RenderSummary:
  """What a call to ``render_checkpoints`` did."""
  files: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
  images: int = 0
  render_seconds: float = 0.0
  setup_seconds: float = 0.0
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def seconds_per_image(self) -> float:
    return self.render_seconds / self.images if self.images else float("nan")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["seconds_per_image"] = self.seconds_per_image
    return d

  def text(self) -> str:
    lines = [f"rendered {self.images} image(s) from {len(self.files)} file(s); "
             f"skipped {len(self.skipped)} file(s)"]
    lines += [f"  ok   {f['path']}: {f['images']} image(s) -> {f['output']}" for f in self.files]
    lines += [f"  skip {s['path']}: {s['reason']}" for s in self.skipped]
    if self.images:
      lines.append(f"  {self.seconds_per_image:.3f} s/image (+{self.setup_seconds:.1f} s model load)")
    lines += [f"  {k} = {v:.4f}" for k, v in sorted(self.metrics.items())]
    return "\n".join(lines)


def _natural_key(path: Path):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def find_checkpoints(checkpoint: Optional[str] = None, checkpoint_dir: Optional[str] = None,
                     pattern: Optional[str] = None) -> list[Path]:
  """The embeddings files to render, in natural order (node_2 before node_10).

  Args:
    checkpoint: one file (reported later if missing or bad).
    checkpoint_dir: a folder searched with ``pattern``.
    pattern: glob within checkpoint_dir; default: ``*_embeddings_r*.safetensors`` and ``.pt``.

  Raises:
    RenderError: neither or both sources given, the folder is missing, or nothing matches.
  """
  if bool(checkpoint) == bool(checkpoint_dir):
    raise RenderError("give exactly one of --checkpoint FILE or --checkpoint_dir DIR")
  if checkpoint:
    return [Path(checkpoint)]
  d = Path(checkpoint_dir)
  if not d.is_dir():
    raise RenderError(f"--checkpoint_dir {d} is not a directory")
  patterns = (pattern,) if pattern else DEFAULT_PATTERNS
  found = sorted({p for pat in patterns for p in d.glob(pat) if p.is_file()}, key=_natural_key)
  if not found:
    raise RenderError(f"no file in {d} matches {' or '.join(patterns)}")
  return found


def _prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
  if output_dir.exists() and not output_dir.is_dir():
    raise RenderError(f"--output_dir {output_dir} exists and is not a directory")
  if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
    raise RenderError(f"--output_dir {output_dir} exists and is not empty; pass --overwrite to "
                      "write into it (files with the same names are replaced)")
  output_dir.mkdir(parents=True, exist_ok=True)


class _Renderer:
  """The one interface render_checkpoints needs: widths to check, and batched rendering."""
  dims: dict[str, int]

  def render(self, embeddings: dict[str, np.ndarray], seeds: Sequence[int]) -> np.ndarray:
    raise NotImplementedError

  def clear_cache(self) -> None:
    import gc
    gc.collect()


class _SD(_Renderer):

  def __init__(self, model_dir: Path, opts: RenderOptions):
    import jax
    import jax.numpy as jnp
    from a2v_jax.backbones import sd_flax
    device = sd_flax.resolve_device(opts.device)
    platform = (device or jax.devices()[0]).platform
    name = opts.dtype if opts.dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")
    self.sd = sd_flax.load_sd_flax(model_dir, scheduler=opts.scheduler, device=opts.device,
                                   dtype=getattr(jnp, name), decode_batch_size=opts.decode_batch_size)
    self.negative = sd_flax.empty_prompt_embeds(model_dir, self.sd.cross_attention_dim)
    self.dims = {"clip": self.sd.cross_attention_dim}
    self.opts = opts

  def render(self, embeddings, seeds):
    o = self.opts
    clip = embeddings["clip"]
    neg = self.negative
    if neg.shape[1] != clip.shape[1]:
      if neg.any():  # a real CLIP("") encoding: lengths must agree (77 for SD)
        raise ValueError(f"clip sequence length {clip.shape[1]} differs from the negative "
                         f"prompt's {neg.shape[1]}")
      neg = np.zeros((1,) + clip.shape[1:], np.float32)
    return self.sd.render(clip, neg, seeds=seeds, num_inference_steps=o.num_inference_steps,
                          guidance_scale=o.guidance_scale, height=o.height, width=o.width,
                          batch_size=o.batch_size)


class _Flux(_Renderer):

  def __init__(self, model_dir: Path, opts: RenderOptions):
    import torch
    from a2v_jax.backbones import flux_torch
    dtype = None if opts.dtype == "auto" else getattr(torch, opts.dtype)
    self.flux = flux_torch.load_flux(model_dir, device=opts.device, dtype=dtype)
    self.dims = {"clip": self.flux.clip_dim, "t5": self.flux.t5_dim}
    self.opts = opts

  def render(self, embeddings, seeds):
    o = self.opts
    return self.flux(t5=embeddings["t5"], clip=embeddings["clip"], seeds=seeds,
                     num_inference_steps=o.num_inference_steps, guidance_scale=o.guidance_scale,
                     height=o.height, width=o.width)

  def clear_cache(self):
    self.flux.clear_cache()


def resolve_model_dir(opts: RenderOptions) -> Path:
  """``--model_dir`` if given, else the tiny model of the type (written on first use)."""
  if opts.model_dir:
    path = Path(opts.model_dir)
    if not path.is_dir():
      raise RenderError(f"--model_dir {path} is not a directory")
    return path
  from a2v_jax.backbones import paths
  return paths.backbone_dir(BackboneConfig(tiny_dir=opts.tiny_dir), opts.diffusion_type)


def make_renderer(opts: RenderOptions) -> _Renderer:
  """Loads the SD (Flax) or FLUX (torch) renderer chosen by ``opts.diffusion_type``."""
  model_dir = resolve_model_dir(opts)
  return _SD(model_dir, opts) if opts.diffusion_type == "sd" else _Flux(model_dir, opts)


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "x"


def image_name(ef: embeddings_io.EmbeddingsFile, i: int) -> str:
  """``{node}_r{round}_{class}_{sample_id}.png`` for sample i."""
  return f"{ef.node_label}_r{ef.round}_{_safe(ef.class_names[i])}_{_safe(ef.sample_ids[i])}.png"


def _to_uint8(images: np.ndarray) -> np.ndarray:
  return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


SHEET_MAX_IMAGES = 64  # per class sheet; the title says how many were left out
THUMB = 128             # thumbnail side in contact sheets


def thumbnail(img: np.ndarray, side: int = THUMB) -> np.ndarray:
  """Fits an image in side x side: integer nearest-neighbour upscaling for tiny renders (so
  pixels stay visible), area-filtered downscaling for real 512-1024 px renders."""
  from PIL import Image
  h, w = img.shape[:2]
  if max(h, w) <= side:
    k = side // max(h, w)
    size, method = (w * k, h * k), Image.NEAREST
  else:
    f = side / max(h, w)
    size, method = (max(1, round(w * f)), max(1, round(h * f))), Image.BOX
  return np.asarray(Image.fromarray(img).resize(size, method))


def contact_sheet(thumbs: Sequence[np.ndarray], captions: Sequence[str], title: str,
                  *, max_cols: int = 8):
  """A grid of (equal-sized) uint8 thumbnails with a title and one caption each (a PIL Image)."""
  from PIL import Image, ImageDraw
  n = len(thumbs)
  cols = min(max_cols, max(1, math.ceil(math.sqrt(n))))
  rows = math.ceil(n / cols)
  th, tw = thumbs[0].shape[:2]
  cap, head, pad = 14, 22, 4
  sheet = Image.new("RGB", (cols * (tw + pad) + pad, head + rows * (th + cap + pad) + pad), "white")
  draw = ImageDraw.Draw(sheet)
  draw.text((pad, 4), title, fill="black")
  for k, (img, text) in enumerate(zip(thumbs, captions)):
    r, c = divmod(k, cols)
    x, y = pad + c * (tw + pad), head + r * (th + cap + pad)
    sheet.paste(Image.fromarray(img), (x, y))
    draw.text((x, y + th + 1), text[: max(4, tw // 6)], fill="black")
  return sheet


def _render_file(ef: embeddings_io.EmbeddingsFile, renderer: _Renderer, opts: RenderOptions,
                 out_dir: Path, pbar, state: dict) -> list[Path]:
  from PIL import Image
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  by_class: dict[str, list[tuple[np.ndarray, str]]] = {}  # thumbnails only
  count: dict[str, int] = {}
  n = len(ef)
  chunk = opts.batch_size
  for start in range(0, n, chunk):
    idx = range(start, min(start + chunk, n))
    batch = {b: np.asarray(ef.embeddings[b][start:start + len(idx)], np.float32) for b in renderer.dims}
    images = _to_uint8(renderer.render(batch, [opts.seed + i for i in idx]))
    for i, img in zip(idx, images):
      path = out_dir / image_name(ef, i)
      Image.fromarray(img).save(path)
      written.append(path)
      cls = ef.class_names[i]
      count[cls] = count.get(cls, 0) + 1
      if opts.contact_sheets and count[cls] <= SHEET_MAX_IMAGES:
        by_class.setdefault(cls, []).append((thumbnail(img), ef.sample_ids[i]))
    pbar.update(len(idx))
    state["batches"] += 1
    if opts.clear_cache_every and state["batches"] % opts.clear_cache_every == 0:
      renderer.clear_cache()
  if opts.contact_sheets:
    for cls, items in by_class.items():
      shown = "" if count[cls] == len(items) else f", first {len(items)} shown"
      title = f"{cls} - {ef.node_label} round {ef.round} ({count[cls]} image(s){shown})"
      sheet = contact_sheet([x for x, _ in items], [s for _, s in items], title)
      sheet.save(out_dir / f"sheet_{_safe(cls)}.png")
  return written


def _score(summary: RenderSummary, rendered: list[tuple[embeddings_io.EmbeddingsFile, list[Path]]],
           clip_model_dir: str, device: Optional[str], chunk: int = 32) -> None:
  """CLIP zero-shot metrics per rendered file (node/server and round), from the PNGs on disk.

  Candidates are all classes of the rendered files; PNGs are read ``chunk`` at a time.
  """
  from PIL import Image
  from a2v_jax.render.image_metrics import ZeroShotCLIP, classification_metrics
  classes = sorted({c for ef, _ in rendered for c in ef.class_names})
  torch_device = {None: "cpu", "auto": "cpu", "gpu": "cuda"}.get(device, device)
  clf = ZeroShotCLIP(clip_model_dir, classes, device=torch_device)
  index = {c: i for i, c in enumerate(classes)}
  for ef, pngs in rendered:
    pred = np.concatenate([clf.predict(np.stack([np.asarray(Image.open(p).convert("RGB"))
                                                 for p in pngs[s:s + chunk]]))
                           for s in range(0, len(pngs), chunk)])
    m = classification_metrics([index[c] for c in ef.class_names], pred)
    summary.metrics.update({f"test/{ef.node_label}_r{ef.round}/{k}": v for k, v in m.items()})


def render_checkpoints(paths: Sequence[str | Path], opts: RenderOptions) -> RenderSummary:
  """Renders every sample of every embeddings file; bad files are skipped or stop the run.

  Args:
    paths: embeddings files (``find_checkpoints``).
    opts: RenderOptions.

  Returns:
    The RenderSummary (also written to ``output_dir/render_summary.json``).

  Raises:
    RenderError: protected output dir, unusable model dir, or a bad file with on_error="stop".
  """
  from tqdm.auto import tqdm
  out_root = Path(opts.output_dir)
  created = not out_root.exists()
  _prepare_output_dir(out_root, opts.overwrite)
  summary = RenderSummary()
  t0 = time.perf_counter()
  try:
    renderer = make_renderer(opts)
  except Exception as e:  # any load failure (missing dir, bad weights, unknown device) ends the run
    raise RenderError(f"cannot load the {opts.diffusion_type} model: {type(e).__name__}: {e}") from e
  summary.setup_seconds = time.perf_counter() - t0
  rendered = []
  state = {"batches": 0}
  pbar = tqdm(total=0, unit="img", desc="rendering", disable=not opts.progress)

  def fail(path: Path, reason: str) -> None:
    summary.skipped.append({"path": str(path), "reason": reason})
    log.warning("skipping %s: %s", path, reason)
    if opts.on_error == "stop":
      if summary.files:  # what was rendered before the bad file stays described
        _write_summary(out_root, summary)
      else:
        _drop_if_empty(out_root, created)
      raise RenderError(f"{path}: {reason}")

  try:
    for path in paths:
      path = Path(path)
      try:
        ef = embeddings_io.load_embeddings(path)
        embeddings_io.check_branches(ef.embeddings, opts.diffusion_type, where=str(path),
                                     dims=renderer.dims)
      except embeddings_io.EmbeddingsFileError as e:
        fail(path, str(e).removeprefix(f"{path}: "))
        continue
      if ef.diffusion_type != opts.diffusion_type:
        log.info("%s was saved for %s; rendering it with %s", path, ef.diffusion_type,
                 opts.diffusion_type)
      pbar.total += len(ef)
      pbar.set_postfix_str(path.name)
      pbar.refresh()
      out_dir = out_root / _safe(path.stem)
      t1 = time.perf_counter()
      try:
        pngs = _render_file(ef, renderer, opts, out_dir, pbar, state)
      except (ValueError, RuntimeError) as e:
        if opts.verbose:
          log.error("%s", traceback.format_exc())
        fail(path, f"rendering failed ({type(e).__name__}: {e})")
        continue
      dt = time.perf_counter() - t1
      summary.render_seconds += dt
      summary.images += len(pngs)
      summary.files.append({"path": str(path), "node": ef.node_label, "round": ef.round,
                            "images": len(pngs), "classes": list(ef.classes),
                            "output": str(out_dir), "seconds": dt})
      rendered.append((ef, pngs))
      log.info("%s: %d image(s) in %.2f s -> %s", path, len(pngs), dt, out_dir)
  finally:
    pbar.close()
  if not summary.files and summary.skipped:  # nothing could be rendered: an error, not a result to summarise
    _drop_if_empty(out_root, created)
    reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in summary.skipped[:3])
    more = f" (and {len(summary.skipped) - 3} more)" if len(summary.skipped) > 3 else ""
    raise RenderError(f"none of the {len(summary.skipped)} embeddings file(s) could be rendered: {reasons}{more}")
  if opts.clip_model_dir and rendered:
    _score(summary, rendered, opts.clip_model_dir, opts.device)
  _write_summary(out_root, summary)
  return summary


def _drop_if_empty(out_root: Path, created: bool) -> None:
  """Removes the output folder this run created when nothing went into it (a failed run leaves no trace)."""
  if created and out_root.is_dir() and not any(out_root.iterdir()):
    out_root.rmdir()


def _write_summary(out_root: Path, summary: RenderSummary) -> None:
  (out_root / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2, default=str) + "\n")
