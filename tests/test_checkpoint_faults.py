"""Round checkpoints that went wrong: a corrupt or truncated file, other shapes than the config gives, a save
killed half-way. Each ends in a clear error naming what is wrong, or a resume from the last complete round
equal to a straight run -- never a silently wrong state, and the earlier rows are never lost."""

import json
import re
import shutil

import pytest

from a2v_jax import config
from a2v_jax.checkpoint import CheckpointError, CorruptCheckpointError, RoundCheckpointer
from a2v_jax.run import generate
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


def _data_files(run, round_):
  # The round's array data (orbax merges each process's OCDBT files into this one at the end of a save).
  files = sorted(p for p in (run / "state" / str(round_) / "state" / "d").iterdir() if p.is_file())
  assert files
  return files


def _flip_bits(run, round_, count=41):
  """``count`` bits flipped, spread over the round's largest array file."""
  f = max(_data_files(run, round_), key=lambda p: p.stat().st_size)
  b = bytearray(f.read_bytes())
  for i in range(count):
    b[i * len(b) // count] ^= 1 << (i % 8)
  f.write_bytes(bytes(b))


def _other_arrays(run, round_):
  """Silent damage: the round's array files replaced by well-formed ones holding other values (those of the
  round before), which orbax and TensorStore read without a word; only the checksums can tell."""
  shutil.rmtree(run / "state" / str(round_) / "state")
  shutil.copytree(run / "state" / str(round_ - 1) / "state", run / "state" / str(round_) / "state")


def _truncate(run, round_):
  f = max(_data_files(run, round_), key=lambda p: p.stat().st_size)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _remove(run, round_):
  _data_files(run, round_)[0].unlink()


@pytest.mark.parametrize("damage", [_other_arrays, _flip_bits, _truncate, _remove],
                         ids=["other_values", "flipped_bits", "truncated", "missing"])
def test_a_damaged_latest_round_is_set_aside_and_the_run_resumes_from_the_intact_one(tmp_path, prep, done, damage,
                                                                                     capsys):
  """Round 2 damaged, round 1 intact: --resume says so in one line, moves round 2 aside (kept), restores round
  1 and ends bit for bit where a straight run ends; the rows of round 2 are recomputed, not duplicated."""
  straight = done[1]
  run = _two_rounds(tmp_path, done)
  damage(run, 2)
  resumed = train_and_evaluate(_cfg(tmp_path, "r", 4), resume=True, verbose=False, prepared=prep)
  err = capsys.readouterr().err
  assert re.search(r"warning: checkpoint round 2 under .*state is corrupt.*moved aside to .*state_damaged/2", err)
  assert resumed["final"] == straight["final"]
  assert [json.loads(l)["round"] for l in _rows(run).splitlines()] == [1, 2, 3, 4]
  assert (run / "state_damaged" / "2" / "state").is_dir()


def test_every_round_damaged_stops_with_one_line_and_keeps_the_rows(tmp_path, prep, done):
  run = _two_rounds(tmp_path, done)
  before = _rows(run)
  _other_arrays(run, 2)
  _flip_bits(run, 1)
  with pytest.raises(CheckpointError, match=r"no intact checkpoint under .*round\(s\) \[2, 1\] are damaged"):
    train_and_evaluate(_cfg(tmp_path, "r", 4), resume=True, verbose=False, prepared=prep)
  assert _rows(run) == before
  assert sorted(p.name for p in (run / "state_damaged").iterdir()) == ["1", "2"]


def test_silently_changed_arrays_are_caught_where_a_heads_run_is_read(tmp_path, done):
  """generate (and evaluate, the same check) restore a run's arrays as plain dicts: arrays that read fine but
  are not what was saved stop it with one line naming the round and the first array that differs."""
  run = _two_rounds(tmp_path, done)
  heads = generate.inspect_heads_run(run)
  assert heads.round == 2
  server, _ = generate.restore_heads(heads)  # intact: restores
  _other_arrays(run, 2)
  with pytest.raises(generate.GenerateError, match=r"heads checkpoint round 2 under .* is corrupt: \d+ array\(s\) "
                                                   r"differ from what was saved, first clients/"):
    generate.restore_heads(heads)


def test_truncated_metadata_names_the_round(tmp_path, prep, done):
  run = _two_rounds(tmp_path, done)
  meta = run / "state" / "2" / "meta" / "metadata"
  meta.write_text(meta.read_text()[:20])
  ck = RoundCheckpointer(run / "state")
  with pytest.raises(CorruptCheckpointError, match=r"checkpoint round 2 under .*state is unreadable \(file .*2/meta\)"):
    ck.restore(None, {}, 2)
  ck.close()


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


def test_a_torn_last_row_is_run_again_on_resume(tmp_path, prep, done, capsys):
  """A kill during the append of round 3's row (after round 2's checkpoint) leaves half a line: --resume sets it
  aside with one line and ends where a straight run ends, each round logged once."""
  straight = done[1]
  run = _two_rounds(tmp_path, done)
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"round": 3, "round_seconds": 0.0')
  resumed = train_and_evaluate(_cfg(tmp_path, "r", 4), resume=True, verbose=False, prepared=prep)
  assert "is incomplete (a write cut short)" in capsys.readouterr().err
  assert resumed["final"] == straight["final"]
  assert [json.loads(l)["round"] for l in _rows(run).splitlines()] == [1, 2, 3, 4]
  assert (run / "metrics.jsonl.torn").read_text().startswith('{"round": 3')
