"""Round checkpoints that went wrong: a corrupt or truncated file, other shapes than the config gives, a save
killed half-way. Each ends in a clear error naming what is wrong, or a resume from the last complete round
equal to a straight run -- never a silently wrong state, and the earlier rows are never lost."""

import json
import shutil

import pytest

from a2v_jax import config
from a2v_jax.checkpoint import CheckpointError
from a2v_jax.run.trainer import train_and_evaluate
from tests.fakes import synthetic_prepared

BASE = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]",
        "map_heads=2", "num_nodes=3", "checkpoint_frequency=1"]


def _cfg(tmp_path, name, rounds, *extra):
  return config.load(None, BASE + [f'output_dir="{tmp_path}"', f'name="{name}"', f"global_rounds={rounds}", *extra])


@pytest.fixture(scope="module")
def prep():
  return synthetic_prepared()


@pytest.fixture(scope="module")
def done(prep, tmp_path_factory):
  """One 2-round run (checkpoints of rounds 1 and 2) and a straight 4-round run, made once."""
  tmp = tmp_path_factory.mktemp("done")
  train_and_evaluate(_cfg(tmp, "r", 2), verbose=False, prepared=prep)
  straight = train_and_evaluate(_cfg(tmp, "straight", 4), verbose=False, prepared=prep)
  return tmp / "r", straight


def _two_rounds(tmp_path, done):
  """A copy of the 2-round run under this test's output_dir (output_dir may change on resume)."""
  shutil.copytree(done[0], tmp_path / "r")
  return tmp_path / "r"


def _rows(run):
  return (run / "metrics.jsonl").read_text()


def test_corrupt_array_file_names_the_round_and_keeps_the_rows(tmp_path, prep, done):
  run = _two_rounds(tmp_path, done)
  before = _rows(run)
  data = [p for p in (run / "state" / "2" / "state").rglob("d/*") if p.is_file()]
  assert data
  for p in data:  # the same size, other bytes
    p.write_bytes(b"\x5a" * p.stat().st_size)
  with pytest.raises(CheckpointError, match=r"checkpoint round 2 under .*state is corrupt"):
    train_and_evaluate(_cfg(tmp_path, "r", 4), resume=True, verbose=False, prepared=prep)
  assert _rows(run) == before


def test_truncated_metadata_names_the_round(tmp_path, prep, done):
  run = _two_rounds(tmp_path, done)
  meta = run / "state" / "2" / "meta" / "metadata"
  meta.write_text(meta.read_text()[:20])
  with pytest.raises(CheckpointError, match=r"checkpoint round 2 under .*state is unreadable"):
    train_and_evaluate(_cfg(tmp_path, "r", 4), resume=True, verbose=False, prepared=prep)


def test_other_shapes_than_the_config_gives_are_listed(tmp_path, prep, done):
  run = _two_rounds(tmp_path, done)
  before = _rows(run)
  wider = synthetic_prepared(clip=6)  # same config, other text-target width: other head shapes
  with pytest.raises(CheckpointError, match=r"(?s)checkpoint round 2 has other shapes.*\['clip'\].*!= expected"):
    train_and_evaluate(_cfg(tmp_path, "r", 4), resume=True, verbose=False, prepared=wider)
  assert _rows(run) == before


def test_save_killed_half_way_resumes_from_the_last_complete_round(tmp_path, prep, done):
  """A save killed half-way leaves orbax's temporary folder for its round; --resume ignores it, restarts
  from the last complete round and ends bit for bit where a straight run ends."""
  straight = done[1]
  run = _two_rounds(tmp_path, done)
  half = run / "state" / "3.orbax-checkpoint-tmp-1733500000"  # a round-3 save that never finished
  shutil.copytree(run / "state" / "2", half)
  (half / "commit_success.txt").unlink()
  for p in list(half.rglob("d/*"))[:1]:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  resumed = train_and_evaluate(_cfg(tmp_path, "r", 4), resume=True, verbose=False, prepared=prep)
  assert resumed["final"] == straight["final"]
  rounds = [json.loads(l)["round"] for l in _rows(run).splitlines()]
  assert rounds == [1, 2, 3, 4]
  assert sorted(p.name for p in (run / "state").iterdir() if p.name.isdigit()) == ["3", "4"]
