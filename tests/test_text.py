"""Offline tokenizers, tiny text encoders and per-class text targets (a2v_jax.backbones.{tokenizers,tiny_text,text})."""

import filecmp
import gzip
import hashlib
import math

import numpy as np
import pytest
import regex
import sentencepiece as spm
import torch
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from a2v_jax.backbones import text, tiny_text, tokenizers

NAMES = ["zero", "one", "rail_transport"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_text")
  return tiny_text.write_tiny_clip_text(root / "clip"), tiny_text.write_tiny_t5(root / "t5")


# ---------------------------------------------------------------------------------------------- tokenizers


def _openai_clip_ids(prompt: str) -> list[int]:
  """OpenAI's SimpleTokenizer, re-implemented independently from the BPE file (ftfy/html steps omitted)."""
  lines = gzip.open(tokenizers.CLIP_BPE_PATH).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  merges = [tuple(line.split()) for line in lines]
  bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  cs = bs + [256 + i for i in range(256 - len(bs))]
  byte_enc = dict(zip(bs + [b for b in range(256) if b not in bs], map(chr, cs)))
  vocab = list(byte_enc.values())
  vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
  encoder = {t: i for i, t in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}
  ranks = {m: i for i, m in enumerate(merges)}
  pattern = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                          r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
  ids = [encoder["<|startoftext|>"]]
  for token in regex.findall(pattern, " ".join(prompt.split()).lower()):
    word = [byte_enc[b] for b in token.encode("utf-8")]
    word[-1] += "</w>"
    while len(word) > 1:
      pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, math.inf))
      if pair not in ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    ids += [encoder[w] for w in word]
  return ids + [encoder["<|endoftext|>"]]


def test_clip_tokenizer_gives_real_clip_ids():
  tok = tokenizers.clip_tokenizer()
  assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
  for prompt in ["a photo of the number 7", "A photo of a rail transport!", "It's  the dog's  café, 2024"]:
    assert tok(prompt)["input_ids"] == _openai_clip_ids(prompt), prompt
  padded = tok("a photo of a cat", padding="max_length", max_length=77)["input_ids"]
  assert len(padded) == 77 and padded[7:] == [49407] * 70
  assert len(tok) == 49408 and tok.model_max_length == 77


def test_vendored_assets_are_intact_and_small():
  assert hashlib.sha256(tokenizers.CLIP_BPE_PATH.read_bytes()).hexdigest() == tokenizers.CLIP_BPE_SHA256
  for path in tokenizers.CLIP_BPE_PATH.parent.iterdir():
    assert path.stat().st_size < 2 * 2**20, path
  names = {p.name for p in tokenizers.CLIP_BPE_PATH.parent.iterdir()}
  assert {"LICENSE-CLIP", "LICENSE-open_clip", "README.md"} <= names


def test_tiny_t5_tokenizer_matches_sentencepiece(dirs):
  _, t5_dir = dirs
  sp = spm.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
  reloaded = T5Tokenizer.from_pretrained(str(t5_dir), local_files_only=True)
  direct = tokenizers.tiny_t5_tokenizer(t5_dir)
  for prompt in ["a photo of the number seven", "A photo of a cats, Quail! 42", "the sound of a hand saw"]:
    expected = sp.encode(prompt) + [1]
    assert direct(prompt)["input_ids"] == expected
    assert reloaded(prompt)["input_ids"] == expected
  # Whole words are pieces, so every FSDD prompt fits FLUX's 17-token window with room to spare.
  assert sp.encode("a photo of the number seven", out_type=str) == [
      "\u2581a", "\u2581photo", "\u2581of", "\u2581the", "\u2581number", "\u2581seven"]


def test_tiny_t5_spiece_training_is_deterministic():
  model = tokenizers.train_tiny_t5_spiece()
  assert model == tokenizers.train_tiny_t5_spiece()
  spec = [p for n, w, _, p in tokenizers._fields(model) if n == tokenizers.TRAINER_SPEC_FIELD]
  assert len(spec) == 1 and not any(p is not None and p.endswith(b"seeds.tsv") for *_, p in tokenizers._fields(spec[0]))


def test_a_string_is_dropped_from_a_sub_message_on_the_wire():
  """Hand-made ModelProto-like bytes: field 1 (varint 150), field 2 = {3: "abc", 54: "/tmp/x/seeds.tsv", 5: 7},
  field 4 (fixed32); only the path goes and field 2's length shrinks accordingly."""
  sub_keep = bytes([0x1A, 3]) + b"abc" + bytes([0x28, 7])
  path = b"/tmp/x/seeds.tsv"
  sub = bytes([0x1A, 3]) + b"abc" + bytes([0xB2, 0x03, len(path)]) + path + bytes([0x28, 7])
  head, tail = bytes([0x08, 0x96, 0x01]), bytes([0x25, 1, 2, 3, 4])
  msg = head + bytes([0x12, len(sub)]) + sub + tail
  assert tokenizers._without_string(msg, 2, path) == head + bytes([0x12, len(sub_keep)]) + sub_keep + tail
  assert tokenizers._without_string(msg, 2, b"other") == msg


# ---------------------------------------------------------------------------------------------- writers


def test_tiny_writers_are_deterministic_and_skip_when_complete(dirs, tmp_path):
  for written, write in zip(dirs, (tiny_text.write_tiny_clip_text, tiny_text.write_tiny_t5)):
    again = write(tmp_path / written.name)
    files = sorted(p.name for p in written.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer_config.json", tiny_text.MARKER} <= set(files)
    _, mismatch, errors = filecmp.cmpfiles(written, again, files, shallow=False)
    assert mismatch == errors == []
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert write(again) == again and (again / "model.safetensors").stat().st_mtime_ns == stamp
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left behind


def test_tiny_writer_replaces_other_seed_and_refuses_foreign_dirs(tmp_path):
  out = tiny_text.write_tiny_t5(tmp_path / "t5", seed=0)
  before = (out / "model.safetensors").read_bytes()
  tiny_text.write_tiny_t5(out, seed=1)
  assert (out / "model.safetensors").read_bytes() != before
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="a2v_tiny.json"):
    tiny_text.write_tiny_clip_text(foreign)


# ---------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("diffusion_type, shapes", [
    ("sd", {"clip": (3, 77, 32)}),
    ("flux", {"clip": (3, 32), "t5": (3, 17, 32)}),
    ("cogx", {"t5": (3, 226, 32)}),
])
def test_target_shapes(dirs, diffusion_type, shapes):
  clip_dir, t5_dir = dirs
  out = text.compute_text_targets(NAMES, diffusion_type, clip_dir=clip_dir, t5_dir=t5_dir)
  assert {k: v.shape for k, v in out.items()} == shapes
  assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())
  assert text.target_dims(diffusion_type, clip_dir, t5_dir) == {k: s[1:] for k, s in shapes.items()}


def test_t5_length_is_configurable(dirs):
  clip_dir, t5_dir = dirs
  out = text.compute_text_targets(NAMES[:2], "cogx", clip_dir=None, t5_dir=t5_dir, t5_max_length=9)
  assert out["t5"].shape == (2, 9, 32)
  assert text.target_dims("flux", clip_dir, t5_dir, t5_max_length=9) == {"clip": (32,), "t5": (9, 32)}


def test_targets_equal_direct_transformers_calls(dirs):
  clip_dir, t5_dir = dirs
  prompt = "a photo of a rail transport"  # what "rail_transport" becomes: underscores turn into spaces
  clip = CLIPTextModel.from_pretrained(str(clip_dir))
  t5 = T5EncoderModel.from_pretrained(str(t5_dir))
  clip_ids = _openai_clip_ids(prompt)
  t5_ids = spm.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model")).encode(prompt) + [1]
  with torch.no_grad():  # padding as the pipelines do: CLIP with <|endoftext|> to 77, T5 with <pad> to 17
    clip_out = clip(input_ids=torch.tensor([clip_ids + [49407] * (77 - len(clip_ids))]))
    t5_out = t5(input_ids=torch.tensor([t5_ids + [0] * (17 - len(t5_ids))])).last_hidden_state
  eos = len(clip_ids) - 1  # FLUX's pooled CLIP vector is the hidden state at the first <|endoftext|>
  np.testing.assert_array_equal(clip_out.pooler_output.numpy(), clip_out.last_hidden_state[:, eos].numpy())
  flux = text.compute_text_targets(["rail_transport"], "flux", clip_dir=clip_dir, t5_dir=t5_dir,
                                   template="a photo of a {}")
  sd = text.compute_text_targets(["rail_transport"], "sd", clip_dir=clip_dir, t5_dir=None,
                                 template="a photo of a {}")
  np.testing.assert_allclose(flux["clip"], clip_out.pooler_output.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(flux["t5"], t5_out.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(sd["clip"], clip_out.last_hidden_state.numpy(), rtol=0, atol=1e-6)


def test_flux_targets_equal_flux_pipeline_encode_prompt(dirs):
  diffusers = pytest.importorskip("diffusers")
  clip_dir, t5_dir = dirs
  pipe = diffusers.FluxPipeline(
      scheduler=None, vae=None, transformer=None,
      text_encoder=CLIPTextModel.from_pretrained(str(clip_dir)),
      tokenizer=CLIPTokenizer.from_pretrained(str(clip_dir)),
      text_encoder_2=T5EncoderModel.from_pretrained(str(t5_dir)),
      tokenizer_2=T5Tokenizer.from_pretrained(str(t5_dir)))
  with torch.no_grad():
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        text.format_prompts(NAMES), prompt_2=None, device="cpu", max_sequence_length=17)
  out = text.compute_text_targets(NAMES, "flux", clip_dir=clip_dir, t5_dir=t5_dir)
  np.testing.assert_allclose(out["clip"], pooled.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(out["t5"], prompt_embeds.numpy(), rtol=0, atol=1e-6)


def test_classes_get_distinct_targets_and_equal_names_equal_targets(dirs):
  clip_dir, t5_dir = dirs
  for diffusion_type in ("sd", "flux"):
    out = text.compute_text_targets(["zero", "one", "zero"], diffusion_type, clip_dir=clip_dir, t5_dir=t5_dir)
    for value in out.values():
      np.testing.assert_allclose(value[0], value[2], rtol=0, atol=1e-5)  # batch rows: float rounding only
      assert np.abs(value[0] - value[1]).max() > 1e-3


def test_prompt_formatting():
  assert text.format_prompts(["rail_transport", "7"], "a photo of a {}") == [
      "a photo of a rail transport", "a photo of a 7"]
  assert text.format_prompts(["zero"]) == ["a photo of the number zero"]
  with pytest.raises(ValueError, match="must contain"):
    text.format_prompts(["zero"], "a photo")


def test_clear_errors(dirs, tmp_path):
  clip_dir, t5_dir = dirs
  with pytest.raises(ValueError, match="unknown diffusion_type 'sdxl'"):
    text.compute_text_targets(NAMES, "sdxl", clip_dir=clip_dir, t5_dir=t5_dir)
  with pytest.raises(ValueError, match="unknown diffusion_type"):
    text.target_dims("sdxl", clip_dir, t5_dir)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    text.compute_text_targets(NAMES, "sd", clip_dir=tmp_path / "missing", t5_dir=None)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    text.target_dims("cogx", None, tmp_path)
  with pytest.raises(ValueError, match="needs clip_dir"):
    text.compute_text_targets(NAMES, "flux", clip_dir=None, t5_dir=t5_dir)
  with pytest.raises(ValueError, match="holds a 't5' model"):
    text.compute_text_targets(NAMES, "sd", clip_dir=t5_dir, t5_dir=None)
  with pytest.raises(ValueError, match="holds a 'clip_text_model' model"):
    text.target_dims("cogx", None, clip_dir)
  with pytest.raises(ValueError, match="clip_max_length"):
    text.target_dims("sd", clip_dir, None, clip_max_length=78)
  with pytest.warns(UserWarning, match="truncated"):
    text.compute_text_targets(NAMES, "cogx", clip_dir=None, t5_dir=t5_dir, t5_max_length=4)
