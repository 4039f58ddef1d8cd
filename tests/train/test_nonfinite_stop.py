"""The stop after `train.max_nonfinite_steps` consecutive non-finite steps, with the host reading
the counter one step late: same step in the error, no checkpoint or metrics row from the bad
steps, and a streak that ends in time does not stop the run.

The real trainer runs in this process with a stand-in step whose updates are non-finite at chosen
steps (nothing of the model is compiled), zero parameters and a stand-in evaluation.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import stage1
from data_pipelines import synthetic
from depthvlm_jax.train import model_state, trainer

SETTINGS = {"train.total_steps": 7, "ckpt_every": 2, "keep_ckpts": 10, "log_every": 4, "eval_every": 0,
            "eval_qa": 0, "data.buckets": ((64, 96),), "data.seq_len": 64, "train.global_batch": 8,
            "data.synthetic_train": 16, "data.synthetic_test": 2, "train.max_nonfinite_steps": 3}


def bad_steps_programs(bad: tuple[int, int]):
  """A `make_train_programs` stand-in: `accumulate` adds nothing, the update `apply` makes at steps
  bad[0]..bad[1] (1-based) is non-finite."""
  def make(*args, **kwargs):
    def accumulate(state, frozen, acc, micro, counts):
      return acc

    def apply(state, frozen, acc):
      done = state["step"] + 1
      finite = (done < bad[0]) | (done > bad[1])
      nonfinite = jnp.where(finite, 0, state["nonfinite"] + 1)
      zero = jnp.zeros((), jnp.float32)
      metrics = {k: zero for k in ("loss", "depth_loss", "lm_loss", "grad_norm", "param_norm", "update_norm")}
      return dict(state, step=done, nonfinite=nonfinite), dict(metrics, finite=finite, nonfinite=nonfinite)
    return accumulate, apply
  return make


@pytest.fixture
def run(tmp_path, monkeypatch):
  data = tmp_path / "data"
  synthetic.ensure_synthetic_dataset(data, SETTINGS["data.synthetic_train"], SETTINGS["data.synthetic_test"], 0)
  config = ml_collections.ConfigDict(stage1.get_config().to_dict())
  for dotted, value in {**SETTINGS, "data.synthetic_dir": str(data)}.items():
    *path, leaf = dotted.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  monkeypatch.setattr(model_state, "initial_params", lambda config, model, like, rng: jax.tree.map(
      lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), like))
  monkeypatch.setattr(trainer, "evaluate_depth", lambda *a, **k: {"delta1": 0.5, "images": 2, "best_constant_m": 1.0,
                                                                   "best_constant_delta1": 0.25})

  def go(bad):
    monkeypatch.setattr(model_state, "make_train_programs", bad_steps_programs(bad))
    workdir = tmp_path / f"run_{bad[0]}_{bad[1]}"
    try:
      return workdir, trainer.train_and_evaluate(config, str(workdir))
    except trainer.NonFiniteError as e:
      return workdir, e

  return go


def steps_written(workdir):
  ckpts = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  rows = [r["step"] for r in rows if "eval" not in r]  # training rows
  return ckpts, rows


@pytest.mark.slow
def test_stop_at_the_step_that_reaches_the_limit(run):
  # steps 3, 4, 5 non-finite: step 5 is neither a log nor a checkpoint step, so its counter is read
  # late, after step 6 is dispatched; the error still names step 5.
  workdir, err = run((3, 5))
  assert isinstance(err, trainer.NonFiniteError), err
  assert "3 consecutive non-finite steps (loss, gradient or update) at step 5 " in str(err)
  assert "Last good checkpoint: step 2 " in str(err)
  assert steps_written(workdir) == ([2], [4])  # step 4 (2 bad in a row) logged, not checkpointed
  # steps 4..6: step 6 is a checkpoint step, read at once: the run stops before saving it
  workdir, err = run((4, 6))
  assert "3 consecutive non-finite steps (loss, gradient or update) at step 6 " in str(err)
  assert steps_written(workdir) == ([2], [4])


@pytest.mark.slow
def test_a_shorter_streak_does_not_stop_the_run(run):
  workdir, results = run((3, 4))
  assert isinstance(results, dict), results
  assert steps_written(workdir) == ([2, 6, 7], [4, 7])
