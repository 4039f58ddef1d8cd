"""A damaged newest checkpoint (one truncated array file) no longer stops train, predict or export:
restore falls back to the newest intact step and says which step it skipped."""

import logging

import pytest

from depthvlm_jax.runs import checkpoints
from tests.hostile.conftest import error_line, train

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this file out


def damage(step_dir):
  """Truncates the larger files of the step's train state (what a full disk or a cut copy leaves),
  whatever orbax's layout inside the step is: every file over 1 KiB is array data."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 1024]
  assert files
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(10)


def test_restore_params_falls_back_and_names_the_skipped_step(run_copy, caplog):
  workdir, _ = run_copy
  damage(workdir / "checkpoints" / "2")
  with caplog.at_level(logging.WARNING):
    trainable, frozen = checkpoints.restore_params(workdir)  # what predict, evaluate and export call
  assert trainable and frozen
  assert "checkpoint step 2" in caplog.text and "using step 1" in caplog.text


def test_no_intact_checkpoint_is_one_error_naming_the_directory(run_copy):
  workdir, _ = run_copy
  for step in ("1", "2"):
    damage(workdir / "checkpoints" / step)
  with pytest.raises(checkpoints.NoIntactCheckpointError, match="no checkpoint could be restored") as e:
    checkpoints.restore_params(workdir)
  assert str(workdir / "checkpoints") in str(e.value) and "step 2:" in str(e.value) and "step 1:" in str(e.value)


def test_training_resumes_from_the_newest_intact_step(run_copy):
  workdir, data = run_copy
  damage(workdir / "checkpoints" / "2")
  proc = train(workdir, data, "--config.train.total_steps=1")  # step 1 restores; nothing left to train
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert "checkpoint step 2" in proc.stderr and "resuming from step 1" in proc.stderr
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
  assert (workdir / "checkpoints_damaged" / "2").is_dir()  # set aside, not deleted


def test_training_with_every_checkpoint_damaged_stops_with_one_line(run_copy):
  workdir, data = run_copy
  for step in ("1", "2"):
    damage(workdir / "checkpoints" / step)
  before = (workdir / "config.json").read_text()
  proc = train(workdir, data, "--config.train.total_steps=3")
  error_line(proc.returncode, proc.stderr, str(workdir / "checkpoints"), "no checkpoint could be restored")
  assert (workdir / "config.json").read_text() == before
