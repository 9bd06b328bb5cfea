"""load_audio: decoding, mono mix-down, resampling, and a named error for every bad file."""

from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from a2v_jax.data.audio import AudioError, load_audio

FSDD = Path(__file__).resolve().parents[1] / "data" / "fsdd" / "recordings"


def _sine(n, rate, freq=440.0, channels=1):
  t = np.arange(n) / rate
  x = 0.5 * np.sin(2 * np.pi * freq * t)
  return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else x


def test_mono_16k_matches_soundfile(tmp_path):
  path = tmp_path / "a.wav"
  sf.write(path, _sine(1600, 16000), 16000, subtype="PCM_16")
  wave = load_audio(path)
  expected, _ = sf.read(path, dtype="float32")
  assert wave.dtype == np.float32 and wave.ndim == 1
  np.testing.assert_array_equal(wave, expected)


def test_stereo_is_averaged(tmp_path):
  path = tmp_path / "stereo.wav"
  sf.write(path, _sine(800, 16000, channels=2), 16000, subtype="FLOAT")
  data, _ = sf.read(path, dtype="float32")
  np.testing.assert_allclose(load_audio(path), data.mean(axis=1), atol=1e-7)


def test_44k1_is_resampled(tmp_path):
  path = tmp_path / "cd.wav"
  x = _sine(44100, 44100, freq=300.0)
  sf.write(path, x, 44100, subtype="FLOAT")
  wave = load_audio(path, sample_rate=16000)
  assert abs(wave.size - 16000) <= 1
  # An independent polyphase resampler agrees away from the edges.
  ref = scipy.signal.resample_poly(x, 160, 441)
  np.testing.assert_allclose(wave[500:-500], ref[500:wave.size - 500], atol=2e-3)


def test_fsdd_clip_is_upsampled_2x():
  clip = FSDD / "0_george_0.wav"
  if not clip.exists():
    pytest.skip("FSDD not present")
  n8k = sf.info(clip).frames
  assert load_audio(clip).size == 2 * n8k


@pytest.mark.parametrize("kind, reason", [
    ("missing", "not found"),
    ("empty", "empty file"),
    ("no_samples", "no samples"),
    ("corrupt", "cannot decode"),
    ("text", "cannot decode"),
    ("folder", "not a regular file"),
])
def test_bad_files_raise_named_errors(tmp_path, kind, reason):
  path = tmp_path / f"{kind}.wav"
  if kind == "empty":
    path.write_bytes(b"")
  elif kind == "no_samples":
    sf.write(path, np.zeros(0, np.float32), 16000)
  elif kind == "corrupt":
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
  elif kind == "text":
    path.write_text("this is a text file, not audio\n" * 20)
  elif kind == "folder":
    path.mkdir()
  with pytest.raises(AudioError) as e:
    load_audio(path)
  assert str(path) in str(e.value) and reason in str(e.value)
  assert isinstance(e.value, ValueError)
