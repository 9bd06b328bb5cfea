"""Kaldi-style log-mel filterbanks, normalised as AST expects, vectorised over frames and clips.

Why not ``ASTFeatureExtractor`` itself: its numpy path (transformers'
``audio_utils.spectrogram``) loops over frames in Python, one FFT at a time, so
featurising a dataset costs minutes. Here every frame of every clip is cut with one
gather and transformed with one batched ``rfft``; the numbers are the extractor's
(same window, pre-emphasis, DC removal, mel filters, floor, normalisation and
pad/truncate) to within float rounding, which the tests check.

Steps per 25 ms frame (10 ms hop, no centring): remove the frame's mean, pre-emphasis
0.97, symmetric Hann window, |rfft|^2 over 512 points at 16 kHz, Kaldi mel filters
(20 Hz .. Nyquist), ``log(max(x, float32 eps))``; then frames are zero-padded or
truncated to ``max_length`` and everything (padding included, as the extractor does)
is mapped to ``(x - mean) / (2 * std)`` with AudioSet's mean and std.

References:
  Gong et al. 2021, "AST: Audio Spectrogram Transformer" (features and normalisation).
"""

from __future__ import annotations

import functools
import warnings
from typing import Sequence

import numpy as np

# AudioSet statistics used by ASTFeatureExtractor's defaults.
AST_MEAN = -4.2677393
AST_STD = 4.5689974
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07  # float32 eps, Kaldi's log floor.
MIN_FREQUENCY = 20.0
# Frames transformed per rfft call in fbank_batch; bounds memory (~70 MB at 16 kHz).
_CHUNK_FRAMES = 8192


def frame_params(sample_rate: int = 16000) -> tuple[int, int, int]:
  """Kaldi framing at ``sample_rate``: (frame_length, hop_length, fft_length) in samples.

  25 ms window, 10 ms hop, FFT size the next power of two (400, 160, 512 at 16 kHz,
  the values ASTFeatureExtractor hard-codes).
  """
  frame = int(round(0.025 * sample_rate))
  hop = int(round(0.010 * sample_rate))
  fft = 1 << (frame - 1).bit_length()
  return frame, hop, fft


def num_frames(num_samples: int, sample_rate: int = 16000) -> int:
  """Frames a clip of ``num_samples`` yields before padding/truncation.

  Lets callers detect clips longer than ``max_length`` (which :func:`fbank`
  truncates) without computing features. Clips shorter than one window give 0
  frames, i.e. all padding.
  """
  frame, hop, _ = frame_params(sample_rate)
  if num_samples < frame:
    return 0
  return 1 + (num_samples - frame) // hop


@functools.lru_cache(maxsize=8)
def _filters(sample_rate: int, num_mel_bins: int) -> tuple[np.ndarray, np.ndarray]:
  """(window (frame,), mel filters (fft//2+1, mel)) in float64, computed once per setting."""
  # Imported here so importing this module stays cheap (transformers takes ~1 s).
  from transformers.audio_utils import mel_filter_bank, window_function

  frame, _, fft = frame_params(sample_rate)
  with warnings.catch_warnings():
    # With 128 bins the lowest Kaldi filters fall between FFT bins and are all zero,
    # exactly as in the extractor; transformers warns about it on every call.
    warnings.simplefilter("ignore")
    mel = mel_filter_bank(
        num_frequency_bins=fft // 2 + 1,
        num_mel_filters=num_mel_bins,
        min_frequency=MIN_FREQUENCY,
        max_frequency=sample_rate // 2,
        sampling_rate=sample_rate,
        norm=None,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
    )
  window = window_function(frame, "hann", periodic=False)
  return np.asarray(window, np.float64), np.asarray(mel, np.float64)


def _log_mel(frames: np.ndarray, window: np.ndarray, mel: np.ndarray, fft: int) -> np.ndarray:
  """Log-mel energies of raw frames (n, frame) -> (n, mel), float64."""
  frames = frames - frames.mean(axis=1, keepdims=True)
  emphasised = np.empty_like(frames)
  emphasised[:, 1:] = frames[:, 1:] - PREEMPHASIS * frames[:, :-1]
  emphasised[:, 0] = frames[:, 0] * (1.0 - PREEMPHASIS)
  emphasised *= window
  spec = np.fft.rfft(emphasised, n=fft, axis=1)
  power = spec.real ** 2 + spec.imag ** 2
  return np.log(np.maximum(power @ mel, MEL_FLOOR))


def fbank_batch(
    waves: Sequence[np.ndarray],
    *,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    max_length: int = 1024,
) -> np.ndarray:
  """Normalised log-mel features of several clips, each padded/truncated to ``max_length``.

  Only the frames that survive truncation are computed, all clips' frames in a
  few large ``rfft`` calls.

  Args:
    waves: 1-D waveforms at ``sample_rate`` (any lengths; rounded to float32 first,
      as the extractor does).
    sample_rate: Hz; sets the 25 ms / 10 ms framing and the mel range.
    num_mel_bins: mel filters.
    max_length: output frames per clip.

  Returns:
    float32 array ``(len(waves), max_length, num_mel_bins)``.
  """
  if max_length < 1 or num_mel_bins < 1:
    raise ValueError(f"max_length and num_mel_bins must be >= 1, got {max_length}, {num_mel_bins}")
  frame, hop, fft = frame_params(sample_rate)
  window, mel = _filters(sample_rate, num_mel_bins)
  clean = []
  for i, w in enumerate(waves):
    w = np.asarray(w)
    if w.ndim != 1:
      raise ValueError(f"fbank: wave {i} must be 1-D (mono), got shape {w.shape}")
    clean.append(w.astype(np.float32, copy=False))
  counts = np.array([min(num_frames(w.size, sample_rate), max_length) for w in clean], np.int64)

  # Padding rows are zeros before normalisation, exactly like the extractor's.
  pad = (np.float32(0.0) - AST_MEAN) / (AST_STD * 2)  # float32 arithmetic, as the extractor.
  out = np.full((len(clean), max_length, num_mel_bins), pad, np.float32)
  total = int(counts.sum())
  if total == 0:
    return out
  # One flat gather for all frames: row r starts at clip start + frame_index * hop.
  used = [w[: (c - 1) * hop + frame] if c else w[:0] for w, c in zip(clean, counts)]
  flat = np.concatenate(used).astype(np.float64)
  clip_start = np.concatenate([[0], np.cumsum([u.size for u in used])[:-1]])
  frame_in_clip = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
  starts = np.repeat(clip_start, counts) + frame_in_clip * hop
  feats = np.empty((total, num_mel_bins), np.float64)
  offsets = np.arange(frame)
  for lo in range(0, total, _CHUNK_FRAMES):
    hi = min(lo + _CHUNK_FRAMES, total)
    feats[lo:hi] = _log_mel(flat[starts[lo:hi, None] + offsets], window, mel, fft)
  valid = np.arange(max_length)[None, :] < counts[:, None]
  out[valid] = (feats.astype(np.float32) - AST_MEAN) / (AST_STD * 2)
  return out


def fbank(
    wave: np.ndarray,
    *,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    max_length: int = 1024,
) -> np.ndarray:
  """Normalised log-mel features of one clip, as ``ASTFeatureExtractor`` computes them.

  Args:
    wave: 1-D waveform at ``sample_rate``.
    sample_rate: Hz.
    num_mel_bins: mel filters.
    max_length: output frames (zero-padded before normalisation, or truncated).

  Returns:
    float32 array ``(max_length, num_mel_bins)``.
  """
  return fbank_batch([wave], sample_rate=sample_rate, num_mel_bins=num_mel_bins,
                     max_length=max_length)[0]
