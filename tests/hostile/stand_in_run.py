"""`python -m tests.hostile.stand_in_run WORKDIR DATA_DIR`: the hostile suite's finished tiny run.

The real `trainer.train_and_evaluate` with the settings of `conftest.TRAIN_SETTINGS`, except that the
parameters start at zero, the train step only advances the step counter and the evaluation returns
fixed numbers (nothing of the model is compiled). Everything the suite damages or checks is real: config.json, metrics.jsonl, the lock,
and the orbax checkpoints of steps 1 and 2 (train state with optimizer moments, grain iterator state) with
the frozen parameters the run wrote once.
"""

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import stage1
from data_pipelines import synthetic
from depthvlm_jax.train import model_state, trainer
from tests.hostile.conftest import TRAIN_SETTINGS


def stand_in_programs(*args, **kwargs):
  """`make_train_programs`' stand-in: `accumulate` adds nothing, `apply` only advances the step counter."""
  def accumulate(state, frozen, acc, micro, counts):
    return acc

  def apply(state, frozen, acc):
    zero = jnp.zeros((), jnp.float32)
    metrics = {k: zero for k in ("loss", "depth_loss", "lm_loss", "grad_norm", "param_norm", "update_norm")}
    return dict(state, step=state["step"] + 1), dict(metrics, nonfinite=state["nonfinite"])
  return accumulate, apply


def stand_in_params(config, model, like, rng):
  return jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), like)


def stand_in_eval(*args, **kwargs):
  return {"delta1": 0.5, "images": 2, "best_constant_m": 1.0, "best_constant_delta1": 0.25}


def main(workdir: str, data: str) -> None:
  synthetic.ensure_synthetic_dataset(data, TRAIN_SETTINGS["data.synthetic_train"],
                                     TRAIN_SETTINGS["data.synthetic_test"], 0)
  config = ml_collections.ConfigDict(stage1.get_config().to_dict())
  for dotted, value in {**TRAIN_SETTINGS, "data.synthetic_dir": data}.items():
    *path, leaf = dotted.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  model_state.make_train_programs = stand_in_programs
  model_state.initial_params = stand_in_params
  trainer.evaluate_depth = stand_in_eval
  trainer.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  main(*sys.argv[1:3])
