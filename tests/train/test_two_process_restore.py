"""A stage-1 run's checkpoint restores into stage 2 on a mesh spanning two JAX processes, every array
read straight onto its shards (see `tests/train/two_process_restore.py` for what each process checks).

This test process writes the stage-1 run: the default preset's model with `random_params(seed 0)`,
the head as the train state (with Adam moments, which stage 2 must not read) and the frozen rest
once, in bfloat16, as a stage-1 run with `model.frozen_dtype=bfloat16` keeps it.
"""

import pytest
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import stage1
from depthvlm_jax.model.depthvlm import random_params
from depthvlm_jax.train import optim
from depthvlm_jax.runs import checkpoints, freeze, model_from_config
from tests.train.processes import wait_all

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this file out

ROOT = pathlib.Path(__file__).resolve().parents[2]


def write_stage1_run(workdir: pathlib.Path) -> None:
  config = stage1.get_config()
  model = model_from_config.build_model(config)
  params = random_params(model, seed=0)
  trainable, frozen = freeze.split_params(params, freeze.trainable_mask(params, config.train.trainable))
  optimizer = optim.make_optimizer(lambda count: 1e-3, 1.0, 0.0)
  moments = optimizer.update(jax.tree.map(np.ones_like, trainable), optimizer.init(trainable), trainable)[1]
  mgr = checkpoints.manager(workdir / "checkpoints", keep=1, async_save=False)
  checkpoints.save(mgr, 3, {"step": np.int32(3), "params": trainable, "opt_state": moments,
                            "nonfinite": np.int32(0), "skipped_updates": np.int32(0)}, None, None)
  mgr.close()
  checkpoints.save_frozen(workdir, freeze.unflatten({p: v.astype(jnp.bfloat16) for p, v in freeze.flatten(frozen).items()}))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_stage1_checkpoint_restores_into_stage2_across_two_processes(tmp_path):
  run1, run2 = tmp_path / "stage1", tmp_path / "stage2"
  write_stage1_run(run1)
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=str(ROOT))
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.train.two_process_restore", str(run1), str(run2), str(port),
                             str(i)], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
           for i, log in enumerate(logs)]
  wait_all(procs, 300)
  outputs = [log.read_text() for log in logs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-4000:]}"
    assert f"OK {i}:" in out, out[-2000:]
