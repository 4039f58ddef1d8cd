"""Shared pieces of the hostile-input suite: running the CLIs, checking their error reports, and one
tiny trained workdir (2 steps of `main.py`, built once per session) that the tests copy before
damaging."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from data_pipelines import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[2]
# A tiny stage-1 run (the settings of tests/train/test_resume.py, batch 8 to fit 8 simulated devices).
TRAIN_SETTINGS = {"train.total_steps": 2, "ckpt_every": 1, "keep_ckpts": 5, "log_every": 1, "eval_qa": 0,
                  "data.buckets": ((64, 96),), "data.seq_len": 64, "train.global_batch": 8,
                  "model.dpt_features": 16, "model.dpt_out_channels": (8, 16, 16, 16), "model.dpt_head_features": 8,
                  "data.synthetic_train": 8, "data.synthetic_test": 2}
TRAIN_OVERRIDES = [f"--config.{k}={str(v).replace(' ', '')}" for k, v in TRAIN_SETTINGS.items()]


def cli_env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run(*args, timeout=600):
  """Runs `python ARGS...` in the repository root; returns the CompletedProcess (text)."""
  return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=cli_env(), capture_output=True,
                        text=True, timeout=timeout)


def train(workdir, data_dir, *extra):
  return run("main.py", "--config=configs/stage1.py", f"--workdir={workdir}",
             f"--config.data.synthetic_dir={data_dir}", *TRAIN_OVERRIDES, *extra)


def error_line(returncode, stderr: str, *needles: str) -> str:
  """Asserts a user error as every CLI reports one; returns the line.

  Non-zero exit, no traceback, exactly one line starting with "error: ", containing every needle.
  """
  assert returncode not in (0, None), stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """(workdir, synthetic data dir) of a finished 2-step run with checkpoints at steps 1 and 2.

  Written by the real trainer in a one-device process (`tests.hostile.stand_in_run`: config.json,
  metrics, orbax checkpoints of the train state, frozen parameters and grain iterator), with the
  update and the evaluation replaced by stand-ins: these tests exercise what happens around
  training, and compiling the real step would cost a minute.
  """
  base = tmp_path_factory.mktemp("hostile_run")
  data, workdir = base / "data", base / "run"
  proc = run("-m", "tests.hostile.stand_in_run", workdir, data)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  return workdir, data


@pytest.fixture
def run_copy(trained, tmp_path):
  """A fresh copy of the trained workdir (the tests damage it)."""
  workdir, data = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  return copy, data
