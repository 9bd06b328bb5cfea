"""Every CLI ends a project error the same way: exit status 2, one message on stderr, no traceback."""

import json
import shutil
from pathlib import Path

import pytest

from a2v_jax import config

FSDD = Path(__file__).resolve().parents[1] / "data" / "fsdd" / "recordings"


def _refused(capsys, status, *expected):
  err = capsys.readouterr().err
  assert status == 2, err
  assert "Traceback" not in err and err.strip(), err
  for text in expected:
    assert text in err, err
  return err


def test_evaluate_on_a_folder_with_a_corrupt_and_an_empty_wav(tmp_path, capsys):
  from experiments import evaluate
  run, data = tmp_path / "run", tmp_path / "new_speaker"
  run.mkdir()
  data.mkdir()
  (run / "config.json").write_text(json.dumps(config.load("experiments/configs/fsdd_tiny.json", []).to_dict()))
  shutil.copy(FSDD / "0_george_0.wav", data / "0_george_0.wav")
  (data / "1_george_0.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
  (data / "2_george_0.wav").write_bytes(b"")
  err = _refused(capsys, evaluate.main(["--run", str(run), "--data", str(data)]),
                 "1_george_0.wav: cannot decode", "2_george_0.wav: empty file")
  assert "\nerror (FeatureError): 2 of 3 clips could not be used" in err
  assert not list(run.glob("eval_*.json"))


def test_evaluate_on_a_folder_that_is_not_a_run(tmp_path, capsys):
  from experiments import evaluate
  _refused(capsys, evaluate.main(["--run", str(tmp_path), "--data", str(FSDD)]),
           f"{tmp_path} is not a run directory (no config.json)")


def test_render_without_matching_files(tmp_path, capsys):
  from experiments import render
  _refused(capsys, render.main(["--checkpoint_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]),
           "no file in")


def test_seeds_with_a_missing_config(tmp_path, capsys):
  from experiments import seeds
  _refused(capsys, seeds.main(["--config", str(tmp_path / "nope.json"), "--seeds", "0"]), "nope.json")


def test_scaling_with_a_missing_config_and_bad_client_counts(tmp_path, capsys):
  from experiments import scaling
  _refused(capsys, scaling.cli(["--config", str(tmp_path / "nope.json"), "--system-allocator", "--clients", "1"]),
           "nope.json")
  with pytest.raises(SystemExit) as e:  # argparse's own usage error: status 2, one line, no traceback
    scaling.cli(["--clients", "1,ten", "--system-allocator"])
  assert e.value.code == 2
  _refused(capsys, 2, "expected comma-separated client counts")


def test_benchmarks_with_an_unknown_case_or_no_study(tmp_path, capsys):
  from benchmarks import bench_round, profile_round, summarize
  _refused(capsys, bench_round.cli(["--case", "a,zz", "--out", str(tmp_path / "b")]), "unknown --case zz")
  assert not (tmp_path / "b").exists()
  _refused(capsys, profile_round.cli(["--case", "zz"]), "unknown --case zz")
  _refused(capsys, summarize.cli([str(tmp_path)]), f"no scaling.jsonl in {tmp_path}")
  (tmp_path / "scaling.jsonl").write_text("{not json\n")
  _refused(capsys, summarize.cli([str(tmp_path)]), "is not a scaling study's output")
