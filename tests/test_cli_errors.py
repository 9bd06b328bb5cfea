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


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A run directory holding fsdd_tiny's config and round checkpoints 1 and 2 (of small synthetic heads:
  evaluate reads the checkpoint, then the clips, so the shapes are never compared in these tests)."""
  from a2v_jax.run.trainer import train_and_evaluate
  from tests.fakes import synthetic_prepared
  tmp = tmp_path_factory.mktemp("saved_run")
  cfg = config.load(None, ["batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]", "map_heads=2",
                           "num_nodes=3", "global_rounds=2", "checkpoint_frequency=1", f'output_dir="{tmp}"',
                           'name="run"'])
  train_and_evaluate(cfg, verbose=False, prepared=synthetic_prepared())
  (tmp / "run" / "config.json").write_text(json.dumps(config.load("experiments/configs/fsdd_tiny.json", []).to_dict()))
  return tmp / "run"


def test_evaluate_on_a_folder_with_a_corrupt_and_an_empty_wav(tmp_path, capsys, saved_run):
  from experiments import evaluate
  run, data = tmp_path / "run", tmp_path / "new_speaker"
  shutil.copytree(saved_run, run)
  data.mkdir()
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


def test_evaluate_with_a_junk_config_or_a_damaged_checkpoint(tmp_path, capsys, saved_run):
  from experiments import evaluate
  run = tmp_path / "run"
  shutil.copytree(saved_run, run)
  data = next((run / "state" / "2" / "state" / "d").iterdir())
  data.write_bytes(data.read_bytes()[:100])
  _refused(capsys, evaluate.main(["--run", str(run), "--data", str(FSDD)]),
           f"checkpoint round 2 under {run / 'state'} is corrupt")
  shutil.rmtree(run / "state" / "2" / "state")  # well-formed arrays of round 1 under round 2's checksums
  shutil.copytree(run / "state" / "1" / "state", run / "state" / "2" / "state")
  _refused(capsys, evaluate.main(["--run", str(run), "--data", str(FSDD)]), "differ from what was saved")
  _refused(capsys, evaluate.main(["--run", str(run), "--data", str(FSDD), "--round", "7"]),
           "no checkpoint of round 7", "rounds kept: [1, 2]")
  (run / "config.json").write_text("{junk")
  _refused(capsys, evaluate.main(["--run", str(run), "--data", str(FSDD)]), "config.json is corrupt (not JSON")
  assert not list(run.glob("eval_*.json"))


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


def test_evaluate_warns_on_clips_shorter_than_the_window(tmp_path, capsys):
  import numpy as np
  import soundfile as sf
  from a2v_jax.data.records import Clip, ClipSet
  from experiments.evaluate import warn_short_clips
  paths = {}
  for name, n in (("one", 1), ("three", 3), ("window", 200), ("long", 4000)):  # at 8 kHz: 200 = 25 ms
    paths[name] = tmp_path / f"{name}.wav"
    sf.write(paths[name], np.zeros(n, np.float32), 8000)
  clips = tuple(Clip(path=str(p), label=0, group="g", clip_id=k, split="test") for k, p in paths.items())
  short = warn_short_clips(ClipSet("x", ("zero",), clips), 16000)
  assert [s.split(" ")[0] for s in short] == ["one.wav", "three.wav"]
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "2 clip(s) shorter than the front-end's 25 ms window (400 samples at 16000 Hz)" in err


def _usage_refused(capsys, call, flag):
  """argparse's refusal of a numeric flag out of range: exit 2, its usage and one error line naming the flag."""
  with pytest.raises(SystemExit) as e:
    call()
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err
  assert f"error: argument {flag}: expected" in err.strip().splitlines()[-1], err


def test_every_cli_refuses_values_that_could_only_fail_later(tmp_path, capsys):
  """Values that used to fail after minutes of work (or never) are refused before anything is written."""
  from benchmarks import bench_round, kill_resume, profile_round
  from experiments import evaluate, render, run, scaling
  out = f'output_dir="{tmp_path / "runs"}"'
  for bad, key in (("checkpoint_frequency=0", "checkpoint_frequency"), ("clip_adapter_learning_rate=-0.001",
                   "clip_adapter_learning_rate"), ("server_learning_rate=0", "server_learning_rate"),
                   ("generator_checkpoint_frequency=0", "generator_checkpoint_frequency"), ("eval_gap=-1", "eval_gap")):
    _refused(capsys, run.main(["--config", "experiments/configs/fsdd_tiny.json", "--quiet", "--set", out, "--set", bad]),
             f"config key '{key}' must be")
  a_file = tmp_path / "a_file"
  a_file.write_text("not a folder")
  _refused(capsys, run.main(["--config", "experiments/configs/fsdd_tiny.json", "--quiet",
                             "--set", f'output_dir="{a_file}/runs"']),
           f"config key 'output_dir' is '{a_file}/runs', but {a_file} is a file, not a folder")
  assert not (tmp_path / "runs").exists() and a_file.read_text() == "not a folder"
  _usage_refused(capsys, lambda: scaling.cli(["--rounds", "-1"]), "--rounds")
  _usage_refused(capsys, lambda: kill_resume.main(["--rounds", "0", "--out", str(tmp_path / "k")]), "--rounds")
  _usage_refused(capsys, lambda: evaluate.main(["--run", str(tmp_path), "--data", str(FSDD), "--round", "-2"]),
                 "--round")
  _usage_refused(capsys, lambda: render.main(["--checkpoint_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                                              "--batch_size", "0"]), "--batch_size")
  _usage_refused(capsys, lambda: bench_round.cli(["--rounds", "0"]), "--rounds")
  _usage_refused(capsys, lambda: profile_round.cli(["--clients", "0"]), "--clients")
  _usage_refused(capsys, lambda: run.main(["--init-timeout", "0", "--coordinator", "auto"]), "--init-timeout")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
