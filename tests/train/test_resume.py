"""Exact resume after SIGKILL, and the NaN guard stopping a run with its last good checkpoint intact.

The run spans two image buckets (the synthetic scenes of aspect >= 1.5 go to the wider one), so the
resumed run must also continue the bucket sequence and reuse one compiled step per bucket.

Real processes: `python main.py` is killed with SIGKILL once a checkpoint is final, restarted (after
planting a half-written orbax temporary directory, as a kill during an async save leaves), and must
end with the same parameters and the same per-step metrics as an uninterrupted run of the same length.
"""

import json
import os
import re
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipelines import synthetic
from flax.traverse_util import flatten_dict as flatten
from depthvlm_jax.runs import checkpoints
from depthvlm_jax.runs.freeze import merge_params

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this file out

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 6
# A tiny stage-1 run: two small buckets, narrow head, batch 2, checkpoints every 2 steps.
OVERRIDES = [f"--config.train.total_steps={STEPS}", "--config.ckpt_every=2", "--config.keep_ckpts=10",
             "--config.log_every=1", "--config.eval_qa=0", "--config.data.buckets=((64,96),(64,128))",
             "--config.data.seq_len=64", "--config.train.global_batch=2", "--config.model.dpt_features=16",
             "--config.model.dpt_out_channels=(8,16,16,16)", "--config.model.dpt_head_features=8",
             "--config.data.synthetic_train=12", "--config.data.synthetic_test=2"]
TRAIN_KEYS = ("loss", "depth_loss", "grad_norm", "param_norm", "update_norm", "lr", "skipped_updates")


def launch(workdir, data_dir, *extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, str(ROOT / "main.py"), "--config=configs/stage1.py", f"--workdir={workdir}",
         f"--config.data.synthetic_dir={data_dir}", *OVERRIDES, *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=900):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


def final_steps(ckpt_dir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()) if ckpt_dir.exists() else []


def final_params(workdir):
  return flatten(merge_params(*checkpoints.restore_params(workdir)))


def train_rows(workdir, keys=TRAIN_KEYS):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: {k: r[k] for k in keys} for r in rows if "eval" not in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("resume")
  data = base / "data"
  synthetic.ensure_synthetic_dataset(data, 12, 2, 0)
  ref, killed = base / "uninterrupted", base / "killed"
  # One after the other: the uninterrupted run compiles, the killed run loads those programs from the
  # session's compilation cache (tests/conftest.py) instead of compiling them again at the same time.
  finish(launch(ref, data))
  proc = launch(killed, data)
  deadline = time.time() + 600  # generous: the CI machine may be shared
  while not final_steps(killed / "checkpoints") and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  out, _ = proc.communicate()
  return base, data, ref, killed, proc.returncode, out


def test_sigkill_then_restart_matches_uninterrupted_run(runs):
  base, data, ref, killed, code, out = runs
  assert code == -signal.SIGKILL, out[-3000:]
  done = final_steps(killed / "checkpoints")
  assert done and done[-1] < STEPS and not (killed / "results.json").exists(), (done, out[-3000:])
  # what a kill during an asynchronous save leaves behind: an unfinished temporary directory
  tmp = killed / "checkpoints" / f"{done[-1] + 2}.orbax-checkpoint-tmp-1234567890"
  (tmp / "state").mkdir(parents=True, exist_ok=True)
  (tmp / "state" / "half_written").write_bytes(b"\0" * 100)
  out = finish(launch(killed, data))
  library_info = [l for l in out.splitlines() if re.match(r"I\d{4} ", l)
                  and not re.search(r" (trainer|metrics_log)\.py:\d+\]", l)]
  assert not library_info, library_info[:5]  # orbax/absl INFO lines silenced, ours kept
  assert final_steps(killed / "checkpoints")[-1] == STEPS
  assert not [p for p in (killed / "checkpoints").iterdir() if "tmp" in p.name]

  assert train_rows(killed) == train_rows(ref)  # same loss curve, bit for bit, one row per step
  assert sorted(train_rows(ref)) == list(range(1, STEPS + 1))
  buckets = train_rows(killed, ("bucket",))
  assert buckets == train_rows(ref, ("bucket",))
  assert {r["bucket"] for r in buckets.values()} == {"64x96", "64x128"}
  flat_ref, flat_got = final_params(ref), final_params(killed)
  assert flat_ref.keys() == flat_got.keys()
  for k in flat_ref:
    np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(flat_ref[k]), err_msg=str(k))
  ref_results, got_results = (json.loads((w / "results.json").read_text()) for w in (ref, killed))
  assert got_results["synthetic_test"] == ref_results["synthetic_test"]


def test_repeated_nonfinite_steps_stop_with_last_good_checkpoint(runs):
  """Continuing the finished run with a NaN learning rate: every update is refused; after
  max_nonfinite_steps the run stops, naming the last good checkpoint, which still holds the good params."""
  base, data, ref, _, _, _ = runs
  before = final_params(ref)
  proc = launch(ref, data, f"--config.train.total_steps={STEPS + 10}", "--config.train.lr=nan",
                "--config.train.max_nonfinite_steps=3")
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode != 0
  assert f"3 consecutive non-finite steps (loss, gradient or update) at step {STEPS + 3}" in out, out[-3000:]
  assert f"Last good checkpoint: step {STEPS}" in out
  assert final_steps(ref / "checkpoints")[-1] == STEPS
  after = final_params(ref)
  for k in before:
    np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(before[k]))
