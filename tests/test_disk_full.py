"""A full disk during a round checkpoint: one clear error naming the round kept; --resume continues exactly."""

import errno
import json

import orbax.checkpoint as ocp
import pytest

from a2v_jax import checkpoint, config
from a2v_jax.run.trainer import train_and_evaluate
from experiments import cli_errors
from tests.fakes import synthetic_prepared

BASE = ["local_epochs=1", "batch_size=4", "clip_adapter_hidden=[8]", "t5_adapter_hidden=[8]",
        "map_heads=2", "num_nodes=3", "checkpoint_frequency=1"]


def _cfg(tmp_path, name, rounds):
  return config.load(None, BASE + [f'output_dir="{tmp_path}"', f'name="{name}"', f"global_rounds={rounds}"])


def test_is_disk_full_reads_oserrors_and_tensorstore_statuses_through_causes():
  assert checkpoint.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
  assert checkpoint.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
  try:
    try:
      raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/x/d/0.0\": [OS error 28]")
    except ValueError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as wrapped:
    assert checkpoint.is_disk_full(wrapped)
  assert not checkpoint.is_disk_full(OSError(errno.EACCES, "Permission denied"))
  assert not checkpoint.is_disk_full(ValueError("shape mismatch"))


def test_disk_full_in_a_save_names_the_round_kept_and_resume_equals_a_straight_run(tmp_path, monkeypatch):
  prep = synthetic_prepared()
  straight = train_and_evaluate(_cfg(tmp_path, "straight", 4), verbose=False, prepared=prep)

  real_save = ocp.CheckpointManager.save

  def full_at_round_3(self, step, *a, **k):
    if step == 3:
      raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: [OS error 28] No space left on device")
    return real_save(self, step, *a, **k)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_round_3)
  with pytest.raises(checkpoint.DiskFullError) as e:
    train_and_evaluate(_cfg(tmp_path, "full", 4), verbose=False, prepared=prep)
  msg = str(e.value)
  assert "round 3" in msg and "last complete round kept is 2" in msg and "--resume" in msg, msg
  assert cli_errors.is_project_error(e.value) and cli_errors.error_label(e.value) == "disk full"
  state = tmp_path / "full" / "state"
  assert sorted(p.name for p in state.iterdir() if p.name.isdigit()) == ["1", "2"]  # nothing half-written

  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)  # space freed
  resumed = train_and_evaluate(_cfg(tmp_path, "full", 4), resume=True, verbose=False, prepared=prep)
  rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2, 3, 4]  # round 3's row, logged before the failed save, not twice
  assert resumed["final"] == straight["final"]


def test_guard_prints_one_line_for_a_full_disk_met_outside_a_checkpoint(capsys):
  def body():
    raise OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl")
  assert cli_errors.guard(body) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("disk full (free space and run again with --resume): "), err
