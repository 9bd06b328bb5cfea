"""Writers of the tiny random text encoders (CLIP text, T5 encoder) used offline and in tests.

Why: the default run and the tests must work without downloads, yet load text encoders through exactly the
code that loads real checkpoints. So we write tiny, randomly initialised models in Hugging Face layout
(``config.json`` + ``model.safetensors`` + tokenizer files, via ``save_pretrained``) and read them back with
``from_pretrained(dir, local_files_only=True)`` like SD-1.5's or FLUX.1's text encoders.

The CLIP encoder is a ``CLIPTextModel`` (not ``...WithProjection``): SD-1.5 and FLUX.1 both load their
``text_encoder`` as ``CLIPTextModel``; SD conditions on its ``last_hidden_state`` and FLUX uses its
``pooler_output`` (hidden state at the first ``<|endoftext|>``, no projection) as ``pooled_prompt_embeds``.
The T5 encoder mimics T5 v1.1 (gated-GELU MLP, untied embeddings), the family used by FLUX and CogVideoX.

Writes are atomic (a temporary sibling directory renamed into place), skipped when a complete directory with
the same specification exists, and byte-identical across calls for a given seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from a2v_jax.backbones import tokenizers

MARKER = "a2v_tiny.json"  # written last: its presence means the directory is complete
FORMAT_VERSION = 1

TINY_CLIP_TEXT: dict[str, Any] = dict(
    vocab_size=tokenizers.CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=tokenizers.CLIP_MAX_LENGTH, projection_dim=32,
    hidden_act="quick_gelu", bos_token_id=tokenizers.CLIP_BOS_ID, eos_token_id=tokenizers.CLIP_EOS_ID,
    pad_token_id=tokenizers.CLIP_EOS_ID)
# vocab_size is filled in from the trained tokenizer.
TINY_T5: dict[str, Any] = dict(
    d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def write_tiny_clip_text(out_dir: str | Path, *, seed: int = 0) -> Path:
  """Writes a tiny random ``CLIPTextModel`` with the real CLIP tokenizer into ``out_dir``.

  Args:
    out_dir: target directory (created; must not hold anything but an earlier tiny model).
    seed: torch seed of the random initialisation.

  Returns:
    ``out_dir`` as a Path, holding ``config.json``, ``model.safetensors``, ``tokenizer.json``,
    ``tokenizer_config.json`` and the ``a2v_tiny.json`` marker.
  """
  def fill(tmp: Path) -> None:
    model = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT)))
    model.save_pretrained(tmp)
    tokenizers.clip_tokenizer().save_pretrained(tmp)

  spec = {"kind": "clip_text", "seed": seed, "config": TINY_CLIP_TEXT}
  return write_once(Path(out_dir), spec, fill)


def write_tiny_t5(out_dir: str | Path, *, seed: int = 0) -> Path:
  """Writes a tiny random ``T5EncoderModel`` with the tiny trained T5 tokenizer into ``out_dir``.

  Args:
    out_dir: target directory (created; must not hold anything but an earlier tiny model).
    seed: torch seed of the random initialisation.

  Returns:
    ``out_dir`` as a Path, holding ``config.json``, ``model.safetensors``, ``spiece.model``,
    ``tokenizer.json``, ``tokenizer_config.json`` and the ``a2v_tiny.json`` marker.
  """
  def fill(tmp: Path) -> None:
    tokenizers.write_tiny_t5_spiece(tmp)
    tok = tokenizers.tiny_t5_tokenizer(tmp)
    cfg = T5Config(vocab_size=len(tok), **TINY_T5)
    _seeded(seed, lambda: T5EncoderModel(cfg)).save_pretrained(tmp)
    tok.save_pretrained(tmp)

  spec = {"kind": "t5_encoder", "seed": seed, "config": TINY_T5,
          "spiece_vocab_size": tokenizers.TINY_T5_VOCAB_SIZE}
  return write_once(Path(out_dir), spec, fill)


def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
  """Builds a module under a fixed torch seed without disturbing the caller's global RNG."""
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(seed)
    module = make()
  return module.to(torch.float32).eval()


def write_once(out: Path, spec: dict[str, Any], fill: Callable[[Path], None]) -> Path:
  """Fills a temporary sibling of ``out`` and renames it into place, unless ``out`` already matches ``spec``.

  A directory holding our marker with another spec (say, another seed) is replaced; any other existing
  directory is refused rather than overwritten.
  """
  marker = json.loads(json.dumps({"format": FORMAT_VERSION, **spec}))  # tuples -> lists, as read back
  out = Path(out)
  if _read_marker(out) == marker:
    return out
  if out.exists():
    if _read_marker(out) is None:
      raise FileExistsError(
          f"{out} exists but is not a complete tiny model written by a2v_jax (no {MARKER}); remove it or "
          "choose another directory")
    stale = out.with_name(f".{out.name}.stale-{uuid.uuid4().hex[:8]}")
    os.rename(out, stale)
    shutil.rmtree(stale, ignore_errors=True)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    os.chmod(tmp, 0o755)
    fill(tmp)
    (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    try:
      os.rename(tmp, out)
    except OSError:
      if _read_marker(out) != marker:  # not a concurrent writer of the same model finishing first
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def _read_marker(path: Path) -> dict[str, Any] | None:
  try:
    return json.loads((path / MARKER).read_text())
  except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
    return None
