"""Trainable parameters and checkpoint bytes of a stage-2 train state, full fine-tuning against LoRA.

`python -m benchmarks.lora_state [--preset paper_4b] [--ranks 0,16]`: for each rank (0 = full
fine-tuning) the run's parameter layout (`model_from_config.params_like`) and train state
(`model_state.abstract_state`: trainable parameters, AdamW moments, counters) are built from
abstract shapes (`jax.eval_shape`; nothing is allocated), on a one-device mesh. Printed per rank:
trainable and frozen parameter counts, the bytes one checkpoint step holds (the train state) and the
bytes of the frozen parameters (written once per run).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags
from flax.traverse_util import flatten_dict

from configs import stage2
from depthvlm_jax import sharding
from depthvlm_jax.runs import freeze, model_from_config
from depthvlm_jax.train import model_state, optim

_PRESET = flags.DEFINE_string("preset", "paper_4b", "config preset of stage 2")
_RANKS = flags.DEFINE_list("ranks", ["0", "16"], "LoRA ranks to compare (0 = full fine-tuning)")


def _count(tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def _bytes(tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def state_sizes(preset: str, rank: int) -> dict:
  config = stage2.get_config(preset).unlock()
  config.train.lora_rank = rank
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  model = model_from_config.build_model(config)
  like, mask = model_from_config.params_like(config, model, mesh)
  trainable, frozen = freeze.split_params(like, mask)
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(1e-4, 100, 0.05), 1.0, 0.0)
  state = model_state.abstract_state(optimizer, trainable, mesh)
  adapters = [p for p in flatten_dict(trainable) if p[-1].endswith(("_lora_a", "_lora_b"))]
  return {"preset": preset, "rank": rank, "alpha": config.train.lora_alpha,
          "trainable_params": _count(trainable), "adapter_matrices": len(adapters),
          "frozen_params": _count(frozen), "checkpoint_step_bytes": _bytes(state),
          "frozen_params_bytes": _bytes(frozen)}


def main(argv):
  del argv
  for rank in map(int, _RANKS.value):
    t0 = time.perf_counter()
    row = state_sizes(_PRESET.value, rank)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
