"""Train DepthVLM: `python main.py --config=configs/stage1.py[:preset] --workdir=DIR [--config.x.y=v]`."""

import logging

from absl import app, flags
from ml_collections import config_flags

from depthvlm_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/stage1.py", "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print({k: v for k, v in results.items()})


if __name__ == "__main__":
  app.run(main)
