"""fbank against transformers' ASTFeatureExtractor (numpy path) and its own spectrogram framing."""

from pathlib import Path

import numpy as np
import pytest
from transformers import ASTFeatureExtractor
from transformers.audio_utils import spectrogram, window_function

from a2v_jax.data.audio import load_audio
from a2v_jax.data.fbank import fbank, fbank_batch, num_frames

FSDD = Path(__file__).resolve().parents[1] / "data" / "fsdd" / "recordings"
TOL = 1e-4
# The extractor's 128-bin Kaldi filters include all-zero ones; transformers warns on each construction.
pytestmark = pytest.mark.filterwarnings("ignore:At least one mel filter:UserWarning")


def _ast(waves, max_length):
  fe = ASTFeatureExtractor(max_length=max_length)
  return np.stack(fe(list(waves), sampling_rate=16000, return_tensors="np")["input_values"])


@pytest.mark.parametrize("max_length", [128, 1024])
def test_matches_ast_on_fsdd(max_length):
  files = [FSDD / f for f in ("0_george_0.wav", "3_jackson_12.wav", "7_nicolas_30.wav", "9_yweweler_4.wav")]
  if not all(f.exists() for f in files):
    pytest.skip("FSDD not present")
  waves = [load_audio(f) for f in files]
  ours = fbank_batch(waves, max_length=max_length)
  ref = _ast(waves, max_length)
  assert ours.shape == ref.shape == (4, max_length, 128) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
  for w, o in zip(waves, ours):
    np.testing.assert_array_equal(fbank(w, max_length=max_length), o)


def _max_length_samples(max_length):
  return 400 + 160 * (max_length - 1)


@pytest.mark.parametrize("n", [
    260,                                # shorter than one window: all padding
    3000,                               # short: padded
    _max_length_samples(64),            # exactly max_length frames
    _max_length_samples(64) + 159,      # still exactly max_length frames
    _max_length_samples(64) + 160,      # one frame too many: truncated
    25000,                              # much longer: truncated
])
def test_matches_ast_on_synthetic(n):
  rng = np.random.default_rng(n)
  t = np.arange(n) / 16000
  wave = (0.3 * np.sin(2 * np.pi * 300 * t * (1 + t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)
  wave[: n // 5] = 0.0  # exact silence exercises the log floor
  np.testing.assert_allclose(fbank(wave, max_length=64), _ast([wave], 64)[0], rtol=0, atol=TOL)


@pytest.mark.parametrize("n", [400, 401, 559, 560, 16000, 23456])
def test_num_frames_matches_spectrogram(n):
  x = np.random.default_rng(0).standard_normal(n)
  spec = spectrogram(x, window_function(400, "hann", periodic=False), frame_length=400,
                     hop_length=160, fft_length=512, power=2.0, center=False)
  assert num_frames(n) == spec.shape[1]


def test_num_frames_below_one_window():
  assert num_frames(0) == num_frames(399) == 0


def test_batch_equals_single_with_mixed_lengths():
  rng = np.random.default_rng(1)
  waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (100, 5000, 12000, 900)]
  batch = fbank_batch(waves, max_length=48, num_mel_bins=64)
  assert batch.shape == (4, 48, 64)
  for w, b in zip(waves, batch):
    np.testing.assert_array_equal(fbank(w, max_length=48, num_mel_bins=64), b)


def test_rejects_multichannel():
  with pytest.raises(ValueError, match="1-D"):
    fbank(np.zeros((2, 1000), np.float32))
