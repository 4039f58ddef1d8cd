"""A run with K micro-batches per update trains like a run with one: the trainer sends each
micro-batch on its own (rows i, i + K, ... of the batch) and counts the loss denominators on the host.

Two real tiny stage-1 runs of the trainer in this process, on its 8 simulated CPU devices, with
the same global batch of 16: one micro-batch of 16 rows, and 2 micro-batches of 8.
"""

import json

import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict as flatten

from configs import stage1
from data_pipelines import synthetic
from depthvlm_jax.runs import checkpoints
from depthvlm_jax.runs.freeze import merge_params
from depthvlm_jax.train import trainer

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this file out

SETTINGS = {"train.total_steps": 2, "ckpt_every": 2, "log_every": 1, "eval_every": 0, "eval_qa": 0,
            "data.buckets": ((64, 96),), "data.seq_len": 64, "train.global_batch": 16, "data.synthetic_train": 32,
            "data.synthetic_test": 2, "model.dpt_features": 16, "model.dpt_out_channels": (8, 16, 16, 16),
            "model.dpt_head_features": 8}
KEYS = ("loss", "depth_loss", "grad_norm", "param_norm", "update_norm", "depth_images")


def _run(tmp_path, data, micro_batches: int):
  config = ml_collections.ConfigDict(stage1.get_config().to_dict())
  for dotted, value in {**SETTINGS, "data.synthetic_dir": str(data), "train.micro_batches": micro_batches}.items():
    *path, leaf = dotted.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  workdir = tmp_path / f"k{micro_batches}"
  trainer.train_and_evaluate(config, str(workdir))
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  rows = [r for r in rows if "loss" in r]
  return rows, flatten(merge_params(*checkpoints.restore_params(workdir)))


def test_two_micro_batches_train_like_one(tmp_path):
  data = tmp_path / "data"
  synthetic.ensure_synthetic_dataset(data, SETTINGS["data.synthetic_train"], SETTINGS["data.synthetic_test"], 0)
  one, params_one = _run(tmp_path, data, 1)
  two, params_two = _run(tmp_path, data, 2)
  assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
  for a, b in zip(one, two):
    for k in KEYS:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, err_msg=f"step {a['step']} {k}")
  assert one[-1]["update_norm"] > 0  # step 2 moves the parameters (step 1 runs at lr 0)
  assert params_one.keys() == params_two.keys()
  for path in params_one:
    np.testing.assert_allclose(np.asarray(params_two[path], np.float32), np.asarray(params_one[path], np.float32),
                               rtol=1e-4, atol=1e-6, err_msg="/".join(path))
