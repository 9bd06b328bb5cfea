"""VEGAS / ESC-50 / VGGSound readers on tiny synthetic folder trees of the reference layouts."""

import json

import numpy as np
import pytest
import soundfile as sf

from a2v_jax.data.esc50 import read_esc50
from a2v_jax.data.registry import DatasetError
from a2v_jax.data.vegas import VEGAS_CLASSES, read_vegas
from a2v_jax.data.vggsound import read_vggsound

SR = 8000


def _wav(path, seconds=0.1):
  path.parent.mkdir(parents=True, exist_ok=True)
  t = np.arange(int(SR * seconds)) / SR
  sf.write(str(path), (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR)


# ---------------------------------------------------------------- VEGAS


def _vegas_class(root, name, ytids, *, skip_jpg=(), skip_wav=(), csv=True, blank_line=False):
  d = root / name
  (d / "img").mkdir(parents=True)
  (d / "audios").mkdir(parents=True)
  lines = ["YTID,start_second,end_second"]
  for i, y in enumerate(ytids):
    lines.append(f"{y},{i},{i + 10}")
    if blank_line and i == 0:
      lines.append("")
    if i not in skip_wav:
      _wav(d / "audios" / f"video_{i:05d}.wav", 0.1 + 0.1 * i)
    if i not in skip_jpg:
      (d / "img" / f"video_{i:05d}.jpg").write_bytes(b"")
  if csv:
    (d / "video_info.csv").write_text("\n".join(lines) + "\n")
  return d


def test_vegas_counts_labels_groups(tmp_path):
  _vegas_class(tmp_path, "dog", ["y0", "y1"])
  _vegas_class(tmp_path, "baby_cry", ["b0", "b1", "b2"], blank_line=True)
  (tmp_path / "ast_cache").mkdir()  # other folders are ignored
  cs = read_vegas(tmp_path, selected_classes=["dog", "baby_cry"])
  assert cs.name == "vegas" and cs.class_names == VEGAS_CLASSES
  # Fixed labels (baby_cry 0, dog 2), class-major, then CSV row; a blank line takes no index.
  assert [c.clip_id for c in cs.clips] == [
      "baby_cry/video_00000", "baby_cry/video_00001", "baby_cry/video_00002",
      "dog/video_00000", "dog/video_00001"]
  assert cs.labels.tolist() == [0, 0, 0, 2, 2]
  assert [c.group for c in cs.clips] == ["b0", "b1", "b2", "y0", "y1"]
  assert all(c.split is None for c in cs.clips)
  np.testing.assert_allclose([c.duration for c in cs.clips], [0.1, 0.2, 0.3, 0.1, 0.2], atol=1e-3)
  assert cs.clips[0].path.endswith("baby_cry/audios/video_00000.wav")


def test_vegas_missing_files_skip_or_error(tmp_path, caplog):
  d = _vegas_class(tmp_path, "dog", ["y0", "y1", "y2"], skip_jpg=(1,), skip_wav=(2,))
  cs = read_vegas(tmp_path, selected_classes=["dog"], durations=False)
  assert [c.clip_id for c in cs.clips] == ["dog/video_00000"]
  assert "skipped 2 entries" in caplog.text
  # Audio only: the row without its jpg counts.
  cs = read_vegas(tmp_path, selected_classes=[2], require_image=False, durations=False)
  assert [c.clip_id for c in cs.clips] == ["dog/video_00000", "dog/video_00001"]
  with pytest.raises(DatasetError, match=rf"video_info.csv:3: .*video_00001.*{d / 'img' / 'video_00001.jpg'}"):
    read_vegas(tmp_path, selected_classes=["dog"], on_missing="error")


def test_vegas_without_csv_lists_audio(tmp_path):
  _vegas_class(tmp_path, "drum", ["a", "b", "c"], csv=False, skip_wav=(1,))
  cs = read_vegas(tmp_path, selected_classes=["drum"], durations=False)
  assert [c.clip_id for c in cs.clips] == ["drum/video_00000", "drum/video_00002"]
  assert cs.labels.tolist() == [3, 3]


def test_vegas_bad_input(tmp_path):
  with pytest.raises(DatasetError, match="VEGAS root not found"):
    read_vegas(tmp_path / "nope")
  _vegas_class(tmp_path, "dog", ["y0"])
  with pytest.raises(DatasetError, match=r"class folders not found: .*baby_cry"):
    read_vegas(tmp_path)
  with pytest.raises(DatasetError, match=r"unknown classes 'dogs' \(did you mean 'dog'\?\)"):
    read_vegas(tmp_path, selected_classes=["dogs"])
  with pytest.raises(DatasetError, match="unknown classes 10"):
    read_vegas(tmp_path, selected_classes=[10])
  (tmp_path / "dog" / "video_info.csv").write_text("YTID,start_second,end_second\ny0,0,10\ny1,1\n")
  with pytest.raises(DatasetError, match=r"video_info.csv:3: expected 3 fields"):
    read_vegas(tmp_path, selected_classes=["dog"])
  _vegas_class(tmp_path, "drum", ["a"])
  for p in (tmp_path / "drum" / "img").iterdir():
    p.unlink()
  (tmp_path / "drum" / "img").rmdir()
  with pytest.raises(DatasetError, match="image folder of class 'drum'.*require_image=False"):
    read_vegas(tmp_path, selected_classes=["drum"])


# ---------------------------------------------------------------- ESC-50


def _esc50(root, folds, classes=("dog", "rooster", "rain"), skip=()):
  root.mkdir(parents=True, exist_ok=True)
  (root / "class_labels.json").write_text(json.dumps({c: i for i, c in enumerate(classes)}))
  for k, entries in enumerate(folds):
    (root / f"fold0{k}.json").write_text(json.dumps(entries, indent=1))
    (root / "audio" / f"fold0{k}").mkdir(parents=True)
    for name in entries:
      if name not in skip:
        _wav(root / "audio" / f"fold0{k}" / name, 0.05)


FOLDS = [{"1-2-A-1.wav": ["rooster"], "1-1-A-0.wav": ["dog"]},
         {"2-1-A-0.wav": ["dog"], "2-3-A-2.wav": ["rain"]}]


def test_esc50_counts_labels_groups(tmp_path):
  _esc50(tmp_path, FOLDS)
  cs = read_esc50(tmp_path)
  assert cs.name == "esc50" and cs.class_names == ("dog", "rooster", "rain")
  assert [c.clip_id for c in cs.clips] == ["1-1-A-0", "1-2-A-1", "2-1-A-0", "2-3-A-2"]
  assert cs.labels.tolist() == [0, 1, 0, 2]
  assert [c.group for c in cs.clips] == ["fold00", "fold00", "fold01", "fold01"]
  assert all(c.split is None and abs(c.duration - 0.05) < 1e-3 for c in cs.clips)
  cs = read_esc50(tmp_path, selected_classes=["dog"], durations=False)
  assert [c.clip_id for c in cs.clips] == ["1-1-A-0", "2-1-A-0"] and len(cs.class_names) == 3


def test_esc50_missing_wav_errors_by_default(tmp_path, caplog):
  _esc50(tmp_path, FOLDS, skip=("2-3-A-2.wav",))
  with pytest.raises(DatasetError, match=r"fold01.json:5: entry '2-3-A-2.wav': missing .*fold01/2-3-A-2.wav"):
    read_esc50(tmp_path)
  assert len(read_esc50(tmp_path, on_missing="skip", durations=False)) == 3
  assert "skipped 1 entries" in caplog.text


def test_esc50_bad_metadata(tmp_path):
  with pytest.raises(DatasetError, match="ESC-50 root not found"):
    read_esc50(tmp_path / "nope")
  _esc50(tmp_path, FOLDS)
  (tmp_path / "fold01.json").write_text('{\n "2-1-A-0.wav": ["dgo"]\n}')
  with pytest.raises(DatasetError, match=r"fold01.json:2: entry '2-1-A-0.wav' has unknown class 'dgo'"):
    read_esc50(tmp_path)
  (tmp_path / "fold01.json").write_text('{\n "2-1-A-0.wav": ["dog"],\n}')
  with pytest.raises(DatasetError, match=r"fold01.json:3: invalid JSON"):
    read_esc50(tmp_path)
  (tmp_path / "fold01.json").write_text('{"1-1-A-0.wav": ["dog"]}')
  with pytest.raises(DatasetError, match="already listed at .*fold00.json"):
    read_esc50(tmp_path)
  (tmp_path / "class_labels.json").write_text('{"dog": 0, "rooster": 2}')
  with pytest.raises(DatasetError, match=r"class_labels.json: class indices must be 0..1"):
    read_esc50(tmp_path)


def test_esc50_missing_audio_folder(tmp_path):
  _esc50(tmp_path, FOLDS)
  for p in (tmp_path / "audio" / "fold01").iterdir():
    p.unlink()
  (tmp_path / "audio" / "fold01").rmdir()
  with pytest.raises(DatasetError, match="audio folder of fold01 not found"):
    read_esc50(tmp_path)


# ---------------------------------------------------------------- VGGSound

CSV = """# YouTube ID, start seconds, label, train/test split
aaa,1,dog barking,train
bbb,30,"child speech, kid speaking",train
ccc,0,dog barking,test

ddd,5,cat meowing,test
aaa,1,dog barking,train
"""


def _vggsound(root, csv=CSV):
  root.mkdir(parents=True, exist_ok=True)
  (root / "vggsound.csv").write_text(csv)
  _wav(root / "train" / "audios" / "aaa_000001.wav")
  _wav(root / "train" / "audios" / "bbb_30.wav")
  _wav(root / "test" / "audios" / "ccc_000000.wav")
  _wav(root / "test" / "audios" / "ccc_000007.wav")  # not in the CSV: ignored


def test_vggsound_labels_from_csv(tmp_path, caplog):
  _vggsound(tmp_path)
  cs = read_vggsound(tmp_path)
  assert cs.name == "vggsound"
  assert cs.class_names == ("cat meowing", "child speech, kid speaking", "dog barking")
  # Each clip gets its own row's label (the reference put all in the first class).
  assert [(c.clip_id, cs.class_names[c.label], c.split) for c in cs.clips] == [
      ("bbb_000030", "child speech, kid speaking", "train"),
      ("aaa_000001", "dog barking", "train"),
      ("ccc_000000", "dog barking", "test")]
  assert [c.group for c in cs.clips] == ["bbb", "aaa", "ccc"]
  assert all(abs(c.duration - 0.1) < 1e-3 for c in cs.clips)
  assert "skipped 1 entries" in caplog.text  # ddd has no wav
  cs = read_vggsound(tmp_path, selected_classes=["Dog_Barking"], durations=False)
  assert [c.clip_id for c in cs.clips] == ["aaa_000001", "ccc_000000"]


def test_vggsound_missing_wav_error_mode(tmp_path):
  _vggsound(tmp_path)
  with pytest.raises(DatasetError, match=r"vggsound.csv:6: missing .*test/audios/ddd_5.wav"):
    read_vggsound(tmp_path, on_missing="error")


@pytest.mark.parametrize("line, message", [
    ("eee,xx,dog barking,train", "start second must be a non-negative integer"),
    ("eee,1,dog barking,val", "split must be one of"),
    ("eee,1,train", "expected 4 fields"),
    ("aaa,1,cat meowing,train", "listed at line 2 as 'dog barking'/train"),
])
def test_vggsound_bad_csv_lines(tmp_path, line, message):
  _vggsound(tmp_path, CSV + line + "\n")
  with pytest.raises(DatasetError, match=rf"vggsound.csv:8: {message}|vggsound.csv:8: clip .*{message}"):
    read_vggsound(tmp_path)


def test_vggsound_bad_input(tmp_path):
  with pytest.raises(DatasetError, match="VGGSound root not found"):
    read_vggsound(tmp_path / "nope")
  tmp_path.joinpath("r").mkdir()
  with pytest.raises(DatasetError, match="VGGSound CSV not found"):
    read_vggsound(tmp_path / "r")
  _vggsound(tmp_path / "s")
  with pytest.raises(DatasetError, match=r"unknown classes 'dog barkin' \(did you mean 'dog barking'\?\)"):
    read_vggsound(tmp_path / "s", selected_classes=["dog barkin"])
  for p in (tmp_path / "s" / "test" / "audios").iterdir():
    p.unlink()
  (tmp_path / "s" / "test" / "audios").rmdir()
  with pytest.raises(DatasetError, match="VGGSound test audio folder not found"):
    read_vggsound(tmp_path / "s")
