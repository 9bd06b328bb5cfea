"""Per-class text-embedding targets from frozen CLIP / T5 text encoders (torch, run once, cached by callers).

Why: the heads regress audio features onto the text conditioning a diffusion model would get for the
clip's class prompt (fedgfe spec section 3.1: one target per class, identical for every clip). The encoders
are frozen and the targets few (C classes), so they are computed once with transformers' torch models and
handed to JAX as float32 numpy arrays; nothing here is differentiated.

Targets follow what each pipeline feeds its denoiser (diffusers 0.39):

* ``sd`` (StableDiffusionPipeline.encode_prompt): ``{"clip": (C, 77, d_clip)}``, CLIPTextModel
  ``last_hidden_state`` of the prompt padded to 77 tokens.
* ``flux`` (FluxPipeline.encode_prompt): ``{"clip": (C, d_clip), "t5": (C, L, d_t5)}``, the CLIPTextModel
  ``pooler_output`` (``pooled_prompt_embeds``) and the T5 encoder ``last_hidden_state`` of the prompt padded
  to ``L = t5_max_length`` tokens (17 in the reference), without attention mask, as FLUX does.
* ``cogx`` (CogVideoXPipeline.encode_prompt): ``{"t5": (C, L, d_t5)}``, same T5 recipe, ``L`` = 226 by default.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

DEFAULT_TEMPLATE = "a photo of the number {}"
BRANCHES: dict[str, tuple[str, ...]] = {"sd": ("clip",), "flux": ("clip", "t5"), "cogx": ("t5",)}
# T5 sequence length when none is given: the reference's inferred 17 for FLUX, CogVideoX's own 226.
DEFAULT_T5_MAX_LENGTH: dict[str, int] = {"flux": 17, "cogx": 226}
_MODEL_TYPES = {"clip": ("clip_text_model", "clip"), "t5": ("t5",)}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


def format_prompts(class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
  """Class names -> prompts: underscores become spaces, then ``template.format(name)``.

  Example: ``"rail_transport"`` with ``"a photo of a {}"`` gives ``"a photo of a rail transport"``.
  """
  if "{}" not in template:
    raise ValueError(f"prompt template must contain '{{}}' for the class name, got {template!r}")
  return [template.format(name.replace("_", " ")) for name in class_names]


def target_dims(diffusion_type: str, clip_dir: Optional[str | Path], t5_dir: Optional[str | Path], *,
                t5_max_length: Optional[int] = None,
                clip_max_length: int = 77) -> dict[str, tuple[int, ...]]:
  """Per-class target shape of each branch, read from ``config.json`` only (no weights loaded).

  Lets models be sized before (or without) running the encoders. Shapes exclude the class axis, e.g.
  flux -> ``{"clip": (d_clip,), "t5": (t5_max_length, d_t5)}``.

  Args:
    diffusion_type: "sd", "flux" or "cogx".
    clip_dir, t5_dir: local model directories; the one a diffusion type does not use may be None.
    t5_max_length: T5 tokens per prompt; None = ``DEFAULT_T5_MAX_LENGTH[diffusion_type]``.
    clip_max_length: CLIP tokens per prompt (sd's sequence length).

  Returns:
    branch name -> shape tuple, keys as in ``compute_text_targets``.
  """
  dims: dict[str, tuple[int, ...]] = {}
  for branch in _branches(diffusion_type):
    config = _read_config(branch, clip_dir if branch == "clip" else t5_dir, diffusion_type)
    if branch == "clip":
      _check_clip_length(config, clip_max_length)
      width = config["hidden_size"]
      dims["clip"] = (clip_max_length, width) if diffusion_type == "sd" else (width,)
    else:
      dims["t5"] = (_t5_length(diffusion_type, t5_max_length), config["d_model"])
  return dims


def compute_text_targets(class_names: Sequence[str], diffusion_type: str, *,
                         clip_dir: Optional[str | Path], t5_dir: Optional[str | Path],
                         template: str = DEFAULT_TEMPLATE, t5_max_length: Optional[int] = None,
                         clip_max_length: int = 77) -> dict[str, np.ndarray]:
  """Encodes one prompt per class into the diffusion model's text-conditioning targets.

  The reference's prompt template is unknown; ours is explicit: each class name, with
  underscores turned into spaces, is put into ``template`` (config default ``"a photo of the number {}"``,
  made for FSDD's digits; e.g. ``"a photo of a {}"`` suits VEGAS/ESC-50 names). Prompts are padded (and, with
  a warning, truncated) to a fixed length exactly as the pipelines do.

  Args:
    class_names: C class names, in label order.
    diffusion_type: "sd", "flux" or "cogx".
    clip_dir: local ``CLIPTextModel`` directory with its tokenizer (sd, flux), or None for cogx. For a
      diffusers pipeline layout (``.../text_encoder`` without tokenizer files) the sibling ``tokenizer``
      directory is used.
    t5_dir: local T5 encoder directory with its tokenizer (flux, cogx), or None for sd.
    template: prompt template with one ``{}``.
    t5_max_length: T5 tokens per prompt; None = 17 for flux, 226 for cogx.
    clip_max_length: CLIP tokens per prompt (77 in SD and FLUX).

  Returns:
    branch name -> float32 array with a leading class axis C: sd ``{"clip": (C, 77, d_clip)}``;
    flux ``{"clip": (C, d_clip), "t5": (C, L, d_t5)}``; cogx ``{"t5": (C, L, d_t5)}``.
  """
  import torch  # torch and transformers only where targets are computed

  branches = _branches(diffusion_type)
  if len(class_names) == 0:
    raise ValueError("compute_text_targets needs at least one class name")
  prompts = format_prompts(class_names, template)
  targets: dict[str, np.ndarray] = {}
  with torch.inference_mode():
    for branch in branches:
      model_dir = clip_dir if branch == "clip" else t5_dir
      config = _read_config(branch, model_dir, diffusion_type)
      if branch == "clip":
        _check_clip_length(config, clip_max_length)
        from transformers import CLIPTextModel, CLIPTokenizer
        tokenizer = CLIPTokenizer.from_pretrained(str(_tokenizer_dir(model_dir)), local_files_only=True)
        model = CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
        ids = _tokenize(tokenizer, prompts, clip_max_length, "CLIP")
        out = model(input_ids=ids)
        value = out.last_hidden_state if diffusion_type == "sd" else out.pooler_output
      else:
        from transformers import T5EncoderModel, T5Tokenizer
        tokenizer = T5Tokenizer.from_pretrained(str(_tokenizer_dir(model_dir)), local_files_only=True)
        model = T5EncoderModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
        ids = _tokenize(tokenizer, prompts, _t5_length(diffusion_type, t5_max_length), "T5")
        value = model(input_ids=ids).last_hidden_state
      targets[branch] = value.float().cpu().numpy().astype(np.float32)
  return targets


def _branches(diffusion_type: str) -> tuple[str, ...]:
  if diffusion_type not in BRANCHES:
    raise ValueError(f"unknown diffusion_type {diffusion_type!r}; choose one of {list(BRANCHES)}")
  return BRANCHES[diffusion_type]


def _t5_length(diffusion_type: str, t5_max_length: Optional[int]) -> int:
  length = DEFAULT_T5_MAX_LENGTH[diffusion_type] if t5_max_length is None else t5_max_length
  if length < 2:
    raise ValueError(f"t5_max_length must be >= 2 (room for a token and </s>), got {length}")
  return length


def _check_clip_length(config: dict[str, Any], clip_max_length: int) -> None:
  limit = config["max_position_embeddings"]
  if not 2 <= clip_max_length <= limit:
    raise ValueError(f"clip_max_length must be in [2, {limit}] (the CLIP model's max_position_embeddings), "
                     f"got {clip_max_length}")


def _read_config(branch: str, model_dir: Optional[str | Path], diffusion_type: str) -> dict[str, Any]:
  """Reads and checks ``config.json`` of a branch's encoder; a full CLIP config yields its text part."""
  name = f"{branch}_dir"
  if model_dir is None:
    raise ValueError(f"diffusion_type {diffusion_type!r} needs {name} (a local {branch.upper()} text encoder)")
  path = Path(model_dir)
  if not path.is_dir():
    raise FileNotFoundError(f"{name} {str(path)!r} does not exist or is not a directory")
  config_file = path / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{name} {str(path)!r} has no config.json; expected a Hugging Face model directory")
  config = json.loads(config_file.read_text())
  model_type = config.get("model_type")
  if model_type not in _MODEL_TYPES[branch]:
    raise ValueError(f"{name} {str(path)!r} holds a {model_type!r} model; expected model_type in "
                     f"{list(_MODEL_TYPES[branch])}")
  if model_type == "clip":
    config = config.get("text_config") or {}
  return config


def _tokenizer_dir(model_dir: str | Path) -> Path:
  """The model's own directory, or the diffusers sibling (``text_encoder_2`` -> ``tokenizer_2``)."""
  path = Path(model_dir)
  if any((path / f).is_file() for f in _TOKENIZER_FILES):
    return path
  sibling = path.parent / path.name.replace("text_encoder", "tokenizer")
  if path.name.startswith("text_encoder") and any((sibling / f).is_file() for f in _TOKENIZER_FILES):
    return sibling
  raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {str(path)!r}")


def _tokenize(tokenizer: Any, prompts: list[str], max_length: int, what: str) -> Any:
  """Pads to ``max_length`` and truncates as the diffusers pipelines do, warning about cut prompts."""
  ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="pt").input_ids
  full_lengths = [len(x) for x in tokenizer(prompts)["input_ids"]]
  cut = [p for p, n in zip(prompts, full_lengths) if n > max_length]
  if cut:
    warnings.warn(f"{what} prompts longer than {max_length} tokens were truncated (classes may become "
                  f"indistinguishable): {cut[:5]}", stacklevel=3)
  return ids
