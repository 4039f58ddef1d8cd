"""metrics.jsonl + TensorBoard event files: written, re-readable, and purged on resume."""

import json

import numpy as np

from depthvlm_jax.train.metrics_log import MetricsLog, read_event_scalars


def test_event_file_holds_the_logged_values(tmp_path):
  log = MetricsLog(tmp_path, resumed_step=None)
  rows = {s: {"loss": 1.0 / s, "lr": 1e-3 * s, "skipped_samples": {"too_small": s}, "finite": True} for s in (1, 2, 3)}
  for s, row in rows.items():
    log.write(s, row)
  log.write(3, {"delta1": 0.75, "images": 4}, prefix="eval/synthetic_test")
  log.close()
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].stat().st_size > 0
  scalars = read_event_scalars(tmp_path / "tensorboard")
  for s, row in rows.items():
    np.testing.assert_allclose(scalars["train/loss"][s], row["loss"], rtol=1e-6)  # float32 in the event
    np.testing.assert_allclose(scalars["train/lr"][s], row["lr"], rtol=1e-6)
    assert scalars["train/skipped_samples/too_small"][s] == s and scalars["train/finite"][s] == 1.0
  assert scalars["eval/synthetic_test/delta1"] == {3: 0.75}
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == [1, 2, 3, 3] and lines[-1]["eval"] == "synthetic_test"


def test_resume_forgets_steps_after_the_checkpoint(tmp_path):
  log = MetricsLog(tmp_path, resumed_step=None)
  for s in range(1, 6):
    log.write(s, {"loss": float(s)})
  log.close()
  # killed after step 5, restarted from the checkpoint at step 3: steps 4 and 5 are logged again
  log = MetricsLog(tmp_path, resumed_step=3)
  for s in (4, 5):
    log.write(s, {"loss": 10.0 * s})
  log.close()
  scalars = read_event_scalars(tmp_path / "tensorboard")
  assert scalars["train/loss"] == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0}
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
