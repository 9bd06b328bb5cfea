"""Audio decoding: any file soundfile reads -> float32 mono at the model's sample rate.

Why its own module: every dataset reader and the feature cache decode audio the same
way, and a bad file must fail with a message that names it (the reference's
``torchaudio.load`` crashed deep inside a DataLoader worker, far from the path).
soundfile (bundled libsndfile: WAV/FLAC/OGG/MP3) plus soxr replace torchaudio, which
must not be installed (it breaks transformers' ``ASTFeatureExtractor``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from a2v_jax.errors import A2VError


class AudioError(A2VError, ValueError):
  """An audio file that cannot be used; the message names the file and the reason."""


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
  """Decodes an audio file to a 1-D float32 waveform at ``sample_rate``.

  Channels are averaged to mono (as the reference did before resampling) and the
  signal is resampled with soxr's high-quality filter when the file's rate differs.
  Samples keep soundfile's float scale ([-1, 1] for integer PCM), which is what
  ``ASTFeatureExtractor`` and :func:`a2v_jax.data.fbank.fbank` expect.

  Args:
    path: the audio file.
    sample_rate: target rate in Hz.

  Returns:
    A contiguous float32 array of shape ``(num_samples,)``, ``num_samples >= 1``.

  Raises:
    AudioError: the file is missing, not a regular file, empty, not decodable as
      audio, has no samples, or holds non-finite samples.
  """
  if sample_rate < 1:
    raise ValueError(f"sample_rate must be >= 1, got {sample_rate}")
  p = Path(path)
  if not p.exists():
    raise AudioError(f"audio file {p}: not found")
  if not p.is_file():
    raise AudioError(f"audio file {p}: not a regular file")
  if p.stat().st_size == 0:
    raise AudioError(f"audio file {p}: empty file (0 bytes)")
  try:
    data, file_rate = sf.read(str(p), dtype="float32", always_2d=True)
  except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
    raise AudioError(f"audio file {p}: cannot decode as audio ({e})") from e
  if data.shape[0] == 0 or data.shape[1] == 0:
    raise AudioError(f"audio file {p}: contains no samples")
  wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
  if not np.all(np.isfinite(wave)):
    raise AudioError(f"audio file {p}: contains non-finite (NaN/inf) samples")
  if file_rate != sample_rate:
    wave = soxr.resample(wave, file_rate, sample_rate)
    if wave.size == 0:
      raise AudioError(
          f"audio file {p}: too short to resample from {file_rate} Hz to {sample_rate} Hz")
  return np.ascontiguousarray(wave, dtype=np.float32)
