"""A run on Cloud Storage: `main.py --workdir=gs://...` against a GCS API server on localhost.

The server (`gcs` fixture, tests/gcs_emulator.py) runs in this test process; the subprocesses'
clients are pointed at it through their environment. The synthetic data set is written to
`gs://test-bucket/data`. A run is killed once its first checkpoint is final and restarted; it must
end with the losses and parameters of an uninterrupted run. Then `predict`, `export` and
`evaluate` read the run (and the data) from `gs://` and write there, and their outputs are read back.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.gcs_emulator import BUCKET

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
OVERRIDES = [f"--config.train.total_steps={STEPS}", "--config.ckpt_every=2", "--config.keep_ckpts=10",
             "--config.log_every=1", "--config.eval_qa=0", "--config.eval_every=0", "--config.data.buckets=((64,96),)",
             "--config.data.seq_len=64", "--config.train.global_batch=2", "--config.data.synthetic_train=8",
             "--config.data.synthetic_test=2"]


def launch(env, *args):
  env = {k: v for k, v in env.items() if k != "XLA_FLAGS"}  # one CPU device
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def train(env, workdir):
  return launch(env, str(ROOT / "main.py"), "--config=configs/stage1.py", f"--workdir={workdir}",
                f"--config.data.synthetic_dir=gs://{BUCKET}/data", *OVERRIDES)


def finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


def gs(path: str):
  """`epath.Path(path)` with this process's gs:// listings forgotten: gcsfs keeps every listing it has
  made (without expiry by default), and the subprocesses keep writing."""
  from etils import epath
  from etils.epath import backend
  backend.fsspec_backend.fs(path).invalidate_cache()
  return epath.Path(path)


def steps(workdir):
  """The final checkpoint steps: on gs:// orbax writes a step in place and marks it final last."""
  d = gs(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists()
                ) if d.exists() else []


def train_rows(workdir):
  rows = [json.loads(l) for l in (gs(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: {k: r[k] for k in ("loss", "depth_loss", "grad_norm", "lr")} for r in rows if "eval" not in r}


@pytest.mark.slow
def test_killed_run_on_gcs_resumes_exactly_and_is_read_back_from_gcs(gcs):
  from data_pipelines import synthetic
  from depthvlm_jax.runs import checkpoints
  from depthvlm_jax.runs.freeze import merge_params
  from depthvlm_jax.train import metrics_log
  from flax.traverse_util import flatten_dict as flatten

  env, _ = gcs
  synthetic.ensure_synthetic_dataset(f"gs://{BUCKET}/data", 8, 2, 0)
  ref, run = f"gs://{BUCKET}/ref", f"gs://{BUCKET}/run"
  finish(train(env, ref))
  proc = train(env, run)
  deadline = time.time() + 600
  while not steps(run) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  out, _ = proc.communicate()
  assert proc.returncode == -signal.SIGKILL and steps(run) and steps(run)[-1] < STEPS, out[-3000:]
  out = finish(train(env, run))  # the lease of the killed run (same host, pid gone) is taken over
  assert "taking over the workdir lease" in out
  assert steps(run)[-1] == STEPS
  assert train_rows(run) == train_rows(ref) and sorted(train_rows(ref)) == list(range(1, STEPS + 1))
  want, got = (flatten(merge_params(*checkpoints.restore_params(w))) for w in (ref, run))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))
  assert not (gs(run) / "lease.json").exists()  # released at the end
  events = metrics_log.read_event_scalars(f"{run}/tensorboard")
  assert sorted(events["train/loss"]) == list(range(1, STEPS + 1))

  image = f"gs://{BUCKET}/data/rgb/test_00000.png"
  out = finish(launch(env, "-m", "depthvlm_jax.predict", f"--model={run}", f"--image={image}",
                      f"--out=gs://{BUCKET}/predictions", "--max_new_tokens=2"))
  pred = gs(f"gs://{BUCKET}/predictions")
  assert {"test_00000_depth.npy", "test_00000_depth.png", "test_00000_vis.png", "test_00000.ply", "test_00000.json",
          "predictions.jsonl"} <= {p.name for p in pred.iterdir()}, out[-3000:]
  row = json.loads((pred / "predictions.jsonl").read_text().splitlines()[0])
  assert row["name"] == "test_00000" and row["image"] == image
  with (pred / "test_00000_depth.npy").open("rb") as f:
    depth = np.load(f)
  with (gs(f"gs://{BUCKET}/data") / "rgb" / "test_00000.png").open("rb") as f, Image.open(f) as im:
    assert depth.shape == im.size[::-1] and np.isfinite(depth).all()
  out = finish(launch(env, "-m", "depthvlm_jax.export", f"--checkpoint={run}", f"--out=gs://{BUCKET}/export"))
  export = gs(f"gs://{BUCKET}/export")
  names = {p.name for p in export.iterdir()}
  assert {"config.json", "model.safetensors", ".depthvlm_export.json"} <= names, (names, out[-3000:])

  data = f"gs://{BUCKET}/data"
  out = finish(launch(env, "-m", "depthvlm_jax.evaluate", f"--model={run}", "--batch_size=2",
                      f"--data=synthetic={data}/test.jsonl|{data}|{data}", f"--out=gs://{BUCKET}/eval"))
  evaluated = gs(f"gs://{BUCKET}/eval")
  rows = [json.loads(l) for l in (evaluated / "per_image.jsonl").read_text().splitlines()]
  summary = json.loads((evaluated / "results.json").read_text())
  assert len(rows) == 2 and all("results" in r for r in rows), out[-3000:]
  dense = summary["datasets"]["synthetic"]["dense"]
  assert dense["images"] == 2 and dense["delta1"] == pytest.approx(np.mean([r["results"]["dense"]["delta1"]
                                                                             for r in rows]))


@pytest.mark.slow
def test_gcs_workdir_of_unrelated_objects_is_refused(gcs):
  env, _ = gcs
  workdir = f"gs://{BUCKET}/photos"
  (gs(workdir) / "holiday.jpg").write_bytes(b"x")
  proc = train(env, workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0 and f"--workdir={workdir}: holds 1 entries" in out, out[-3000:]
  assert [p.name for p in gs(workdir).iterdir()] == ["holiday.jpg"]
