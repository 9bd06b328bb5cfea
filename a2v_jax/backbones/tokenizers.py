"""Offline tokenizers: the real CLIP vocabulary, and a tiny trained T5 sentencepiece model.

Why this module exists: nothing may be downloaded at run time, yet the tiny text encoders must be loaded by
the same code as real checkpoints, with tokenizers that behave like the real ones.

* CLIP: OpenAI's BPE merge list is vendored in ``a2v_jax/assets/clip_bpe`` (MIT, see its README). The
  vocabulary and merges are derived from it exactly as OpenAI's ``SimpleTokenizer`` does, so token ids equal
  those of the CLIP tokenizers shipped with SD-1.5 and FLUX.1.
* T5: no real ``spiece.model`` is available offline, so tiny T5 encoders use a small unigram sentencepiece
  model trained here, deterministically, from class names and prompt templates (whole words become pieces,
  so prompts stay short enough for FLUX's 17-token T5 window). Real T5 tokenizers load from local dirs.
"""

from __future__ import annotations

import base64
import collections
import functools
import gzip
import io
import json
import string
import tempfile
from pathlib import Path

import sentencepiece as spm
from transformers import CLIPTokenizer, T5Tokenizer

CLIP_BPE_PATH = Path(__file__).resolve().parent.parent / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406  # <|startoftext|>
CLIP_EOS_ID = 49407  # <|endoftext|>, also CLIP's padding token
CLIP_MAX_LENGTH = 77

# Words and templates the tiny T5 sentencepiece model is trained on: digits (FSDD), VEGAS and ESC-50
# class names, and common prompt templates. Anything else still tokenises, character by character.
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_CLASS_NAMES = (
    # VEGAS
    "baby_cry", "chainsaw", "dog", "drum", "fireworks", "helicopter", "printer", "rail_transport", "snoring",
    "water_flowing",
    # ESC-50
    "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow", "rain", "sea_waves",
    "crackling_fire", "crickets", "chirping_birds", "water_drops", "wind", "pouring_water", "toilet_flush",
    "thunderstorm", "crying_baby", "sneezing", "clapping", "breathing", "coughing", "footsteps", "laughing",
    "brushing_teeth", "drinking_sipping", "door_wood_knock", "mouse_click", "keyboard_typing",
    "door_wood_creaks", "can_opening", "washing_machine", "vacuum_cleaner", "clock_alarm", "clock_tick",
    "glass_breaking", "siren", "car_horn", "engine", "train", "church_bells", "airplane", "hand_saw",
)
_TEMPLATES = (
    "a photo of the number {}", "a photo of a {}", "a photo of {}", "the sound of a {}",
    "This is a photo of {}.", "{}",
)
TINY_T5_VOCAB_SIZE = 512  # an upper bound: the trainer keeps fewer pieces on this small corpus


def bytes_to_unicode() -> dict[int, str]:
  """OpenAI CLIP's byte -> printable unicode table (byte-level BPE works on these symbols)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  bs += list(range(ord("®"), ord("ÿ") + 1))
  cs = list(bs)
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
  """CLIP's vocabulary (49,408 tokens) and merges, derived from the vendored BPE file.

  Follows OpenAI's ``SimpleTokenizer``: the 256 byte symbols, the same with ``</w>``, one token per merge
  (``merges[1:48895]``: the first line is a header), then ``<|startoftext|>`` and ``<|endoftext|>``.

  Returns:
    ``(vocab, merges)``: token -> id, and the ordered merge pairs.
  """
  if not CLIP_BPE_PATH.is_file():
    raise FileNotFoundError(f"vendored CLIP BPE file missing: {CLIP_BPE_PATH}")
  lines = gzip.decompress(CLIP_BPE_PATH.read_bytes()).decode("utf-8").split("\n")
  n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48,894
  merges = tuple(tuple(line.split()) for line in lines[1:1 + n_merges])
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != CLIP_VOCAB_SIZE:
    raise ValueError(f"{CLIP_BPE_PATH} gives {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
  return vocab, merges  # type: ignore[return-value]


def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
  """The real CLIP tokenizer (fast, transformers 5), built offline from the vendored vocabulary.

  Args:
    model_max_length: kept as the tokenizer's limit; pipelines pad to it (FLUX fails with an
      ``OverflowError`` when it is left unset).

  Returns:
    A ``CLIPTokenizer`` padding with ``<|endoftext|>``, as SD and FLUX do.
  """
  vocab, merges = clip_vocab_and_merges()
  return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token="<|endoftext|>",
                       model_max_length=model_max_length)


def tiny_t5_corpus() -> list[str]:
  """Training sentences of the tiny T5 tokenizer: every template with every class name, plus one line of
  all printable ASCII characters so that any ASCII text tokenises without ``<unk>``."""
  names = list(_DIGIT_WORDS) + [str(i) for i in range(10)] + list(_CLASS_NAMES)
  names = [n.replace("_", " ") for n in names]
  corpus = [t.format(n) for t in _TEMPLATES for n in names]
  corpus.append(" ".join(string.printable.split()))
  return corpus


def train_tiny_t5_spiece(vocab_size: int = TINY_T5_VOCAB_SIZE) -> bytes:
  """Trains the tiny unigram sentencepiece model; the same bytes on every call.

  T5's special ids are kept (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no BOS). Whole words are given as seed
  pieces: on a corpus this small sentencepiece's own seeding keeps almost only characters and bigrams, so
  "a photo of the number seven" would take 14 tokens instead of 6.

  Args:
    vocab_size: upper bound on the number of pieces (``hard_vocab_limit=False``).

  Returns:
    The serialised ``ModelProto`` (contents of a ``spiece.model`` file).
  """
  corpus = tiny_t5_corpus()
  counts = collections.Counter("\u2581" + w for s in corpus for w in s.split())
  seeds = "".join(f"{w}\t{c}\n" for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
  spm.set_random_generator_seed(0)
  model = io.BytesIO()
  with tempfile.TemporaryDirectory() as tmp:
    seed_file = Path(tmp) / "seeds.tsv"
    seed_file.write_text(seeds, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
        character_coverage=1.0, seed_sentencepieces_file=str(seed_file), minloglevel=2)
    # The trainer records the (temporary) seed-file path in the model; drop it so the bytes never vary.
    return _without_string(model.getvalue(), TRAINER_SPEC_FIELD, str(seed_file).encode())


TRAINER_SPEC_FIELD = 2  # ModelProto.trainer_spec (sentencepiece_model.proto)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    b = buf[i]
    value |= (b & 0x7F) << shift
    i += 1
    if b < 0x80:
      return value, i
    shift += 7


def _encode_varint(value: int) -> bytes:
  out = bytearray()
  while True:
    b = value & 0x7F
    value >>= 7
    out.append(b | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _fields(buf: bytes):
  """(field number, wire type, raw bytes of the whole field, payload of a length-delimited one) of a message."""
  i = 0
  while i < len(buf):
    start = i
    key, i = _varint(buf, i)
    number, wire = key >> 3, key & 7
    payload = None
    if wire == 0:
      _, i = _varint(buf, i)
    elif wire == 1:
      i += 8
    elif wire == 5:
      i += 4
    elif wire == 2:
      n, i = _varint(buf, i)
      payload, i = buf[i:i + n], i + n
    else:
      raise ValueError(f"unexpected protobuf wire type {wire} in a sentencepiece model")
    yield number, wire, buf[start:i], payload


def _without_string(model: bytes, field: int, value: bytes) -> bytes:
  """``model`` (a serialised ModelProto) without the string ``value`` inside its sub-message ``field``: the
  protobuf wire format edited directly, so no generated proto module (and no protobuf runtime version) is needed.
  Fields keep their order, so the bytes are what protobuf's serialiser writes after clearing that field."""
  out = bytearray()
  for number, wire, raw, payload in _fields(model):
    if number == field and wire == 2:
      inner = b"".join(r for _, w, r, p in _fields(payload) if not (w == 2 and p == value))
      out += raw[:len(_encode_varint((number << 3) | 2))] + _encode_varint(len(inner)) + inner
    else:
      out += raw
  return bytes(out)


def write_tiny_t5_spiece(out_dir: str | Path, vocab_size: int = TINY_T5_VOCAB_SIZE) -> Path:
  """Writes ``spiece.model`` of the tiny T5 tokenizer into ``out_dir``, and its ``tokenizer.json``
  (``t5_tokenizer_json``: so transformers loads it without converting the sentencepiece model), and returns the
  ``spiece.model`` path."""
  path = Path(out_dir) / "spiece.model"
  path.parent.mkdir(parents=True, exist_ok=True)
  model = train_tiny_t5_spiece(vocab_size)
  path.write_bytes(model)
  (path.parent / "tokenizer.json").write_text(json.dumps(t5_tokenizer_json(model), ensure_ascii=False))
  return path


NORMALIZER_SPEC_FIELD, PRECOMPILED_CHARSMAP_FIELD = 3, 2  # ModelProto.normalizer_spec.precompiled_charsmap


def t5_tokenizer_json(model: bytes) -> dict:
  """The ``tokenizers`` file of a T5 sentencepiece ``model``, as transformers' T5 converter writes it (Unigram
  pieces and scores, the model's precompiled normalizer, whitespace split + metaspace, ``</s>`` appended), read
  through sentencepiece's own API and the wire format. Why not transformers' converter: it imports
  sentencepiece's generated proto module, which needs protobuf >= 7.36.1, and flwr pins protobuf < 7."""
  sp = spm.SentencePieceProcessor(model_proto=model)
  spec = next(p for n, w, _, p in _fields(model) if n == NORMALIZER_SPEC_FIELD and w == 2)
  charsmap = next((p for n, w, _, p in _fields(spec) if n == PRECOMPILED_CHARSMAP_FIELD and w == 2), b"")
  special = [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in range(sp.get_piece_size()) if sp.is_control(i)
             or sp.is_unknown(i)]
  meta = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
  eos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
  return {
      "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
      "normalizer": {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, meta]},
      "post_processor": {"type": "TemplateProcessing",
                         "single": [{"Sequence": {"id": "A", "type_id": 0}}, eos],
                         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, eos, {"Sequence": {"id": "B", "type_id": 0}},
                                  eos],
                         "special_tokens": {"</s>": {"id": "</s>", "ids": [sp.eos_id()], "tokens": ["</s>"]}}},
      "decoder": meta,
      "model": {"type": "Unigram", "unk_id": sp.unk_id(),
                "vocab": [[sp.id_to_piece(i), sp.get_score(i)] for i in range(sp.get_piece_size())],
                "byte_fallback": False},
  }


def tiny_t5_tokenizer(spiece_dir: str | Path, model_max_length: int = 512) -> T5Tokenizer:
  """Loads the tiny T5 tokenizer from a directory holding its ``spiece.model``.

  Uses ``from_pretrained(dir, extra_ids=0)``: in transformers 5, ``T5Tokenizer(vocab_file=...)`` is accepted
  silently but yields a 4-token vocabulary mapping everything to ``<unk>``. No sentinel (``<extra_id_*>``)
  tokens are added: an encoder-only model never sees them.
  """
  return T5Tokenizer.from_pretrained(str(spiece_dir), extra_ids=0, model_max_length=model_max_length)
