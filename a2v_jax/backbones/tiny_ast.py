"""A tiny random AST written by torch ``transformers``, so tests and smoke runs read real HF files.

Why: no weights can be downloaded on the project machines, yet the loader must be the one
that reads ``MIT/ast-finetuned-audioset-10-10-0.4593``. Writing a tiny ``ASTModel`` with
``save_pretrained`` gives the same on-disk keys, config and preprocessor files, and a
torch model to check parity against. The write is deterministic (seeded, with the global
torch RNG left untouched), atomic (temporary directory + rename, so a crashed or
concurrent writer never leaves a half directory) and skipped when already complete.

HF initialises the CLS/distillation tokens and position embeddings to zeros; here they are
random (seeded), so tests can see them (a position-embedding crop of zeros proves nothing).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Literal

from a2v_jax.backbones import hf

# hidden 64, 2 layers, 4 heads, MLP 128: ~93 k params, 146 tokens at max_length 128.
TINY_AST_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "intermediate_size": 128, "patch_size": 16, "frequency_stride": 10,
                   "time_stride": 10}
Architecture = Literal["ASTModel", "ASTForAudioClassification"]
_FILES = (hf.CONFIG_NAME, hf.SAFETENSORS_NAME, "preprocessor_config.json")
_NUM_LABELS = 5  # classifier size of the ASTForAudioClassification variant


def _expected(max_length: int, num_mel_bins: int, architecture: str) -> dict:
  return {**TINY_AST_CONFIG, "max_length": max_length, "num_mel_bins": num_mel_bins,
          "architectures": [architecture]}


def _is_complete(path: Path, expected: dict) -> bool:
  """True when ``path`` holds a tiny AST with exactly these settings; raises if it holds another."""
  if not path.exists():
    return False
  if not all((path / f).is_file() for f in _FILES):
    missing = [f for f in _FILES if not (path / f).is_file()]
    raise hf.BackboneLoadError(f"{path} exists but is not a complete tiny AST (missing {missing}); "
                             "delete it to rewrite")
  config = json.loads((path / hf.CONFIG_NAME).read_text())
  diff = {k: (config.get(k), v) for k, v in expected.items() if config.get(k) != v}
  if diff:
    raise hf.BackboneLoadError(f"{path} holds a different tiny AST ({{key: (found, wanted)}} = {diff}); "
                             "use another directory or delete it")
  return True


def write_tiny_ast(out_dir: str | Path, *, max_length: int = 128, num_mel_bins: int = 128, seed: int = 0,
                   architecture: Architecture = "ASTModel") -> Path:
  """Writes (once) a tiny random HF AST directory readable by ``load_ast``.

  Args:
    out_dir: the directory to create (its parent is created if needed).
    max_length: fbank frames of the model and of its ``ASTFeatureExtractor`` config.
    num_mel_bins: mel bins, idem.
    seed: torch seed; the same arguments give bit-identical files.
    architecture: ``ASTModel`` or ``ASTForAudioClassification`` (keys prefixed
      ``audio_spectrogram_transformer.``, plus a 5-label classifier). With the same seed
      both hold the same AST weights.

  Returns:
    ``out_dir`` as a Path.
  """
  out = Path(out_dir)
  expected = _expected(max_length, num_mel_bins, architecture)
  if _is_complete(out, expected):
    return out
  import torch  # heavy imports only when a write is needed
  import transformers

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the renamed directory is shared with other users
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(seed)
      config = transformers.ASTConfig(**TINY_AST_CONFIG, max_length=max_length,
                                      num_mel_bins=num_mel_bins, num_labels=_NUM_LABELS)
      model = getattr(transformers, architecture)(config).eval()
    base = getattr(model, model.base_model_prefix, model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
      emb = base.embeddings
      for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
        p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "At least one mel filter has all zero values" (harmless)
      transformers.ASTFeatureExtractor(num_mel_bins=num_mel_bins, max_length=max_length).save_pretrained(tmp)
    try:
      os.rename(tmp, out)
    except OSError:
      if not _is_complete(out, expected):  # lost a race: the winner's copy must be the same
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
