"""Train DepthVLM: `python main.py --config=configs/stage1.py[:preset] [--workdir=DIR] [--config.x.y=v]`.

Without --workdir the run writes to `runs/stage<N>_<preset>` (printed at start), where stage 2's
default `model_init` finds stage 1.

Multi-process (one process per host): add `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` on every process, or launch under SLURM / Open MPI / a Cloud TPU pod, where they are
detected (`--distributed=on` forces `jax.distributed.initialize()` with JAX's own auto-detection).
"""

import os

from absl import app, flags
from ml_collections import config_flags

from configs.common import default_workdir
from depthvlm_jax.train import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/stage1.py", "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results "
                                "(default: runs/stage<N>_<preset> in the current directory).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "auto: start jax.distributed when the flags above are given or a cluster "
                                 "launcher is detected; on: always; off: never.")


def main(argv):
  del argv
  trainer.setup_logging(flags.FLAGS.verbosity)  # library INFO logs (orbax, absl) only with --verbosity=1
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(config.stage, config.preset)
  if distributed.is_main():
    print(f"workdir: {os.path.abspath(workdir)}", flush=True)
  results = trainer.train_and_evaluate(config, workdir)
  if distributed.is_main():
    print({k: v for k, v in results.items()})


if __name__ == "__main__":
  app.run(main)
