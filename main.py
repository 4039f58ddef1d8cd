"""Train DepthVLM: `python main.py --config=configs/stage1.py[:preset] [--workdir=DIR] [--config.x.y=v]`.

Without --workdir the run writes to `runs/stage<N>_<preset>` (printed at start), where stage 2's
default `model_init` finds stage 1.

Multi-process (one process per host): add `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` on every process, or launch under SLURM / Open MPI, or on every worker of a Cloud
TPU VM (pod slice), where `jax.distributed.initialize()` runs with JAX's own cluster detection
(`--distributed=on` forces it elsewhere, `--distributed=off` prevents it). A failure decided on all
processes together (e.g. a reply over the label budget on one host) is reported by process 0 only.
"""

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from depthvlm_jax.presets import default_workdir
from depthvlm_jax import cli
from depthvlm_jax.train import distributed, trainer


def _override_error(argv: list[str], e: Exception) -> str:
  """One line for a `--config.*` override that cannot apply (e.g. a field the config file lacks)."""
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  missing = re.findall(r"'([^']+)'", str(e))
  bad = [o for o in overrides if missing and missing[-1] in o.split(".")] or overrides
  hint = ""
  if any(o.startswith(("--config.data.train_files.", "--config.data.eval_files.")) for o in bad):
    hint = ("; data.train_files / data.eval_files entries cannot be added on the command line: list them in a "
            "config file (e.g. a copy of configs/stage1.py with c.data.train_files = "
            "{'NAME': 'ann.jsonl|image_root|depth_root'}) and pass --config=THAT_FILE")
  where = " ".join(bad) if bad else "--config"
  return (f"error: {where}: cannot apply this override ({type(e).__name__}: {cli.one_line(e)}); the field must "
          f"exist in the config file{hint}")


# The config file is read, and the `--config.*` overrides applied, when the flag is defined.
try:
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/stage1.py", "Training configuration file.",
                                            lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as _e:
  sys.exit(_override_error(sys.argv, _e))
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results "
                                "(default: runs/stage<N>_<preset> in the current directory).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "auto: start jax.distributed when the flags above are given or a cluster "
                                 "launcher is detected; on: always; off: never.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a `--config.*` override that cannot apply reported on one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # absl's own flag errors; a config file that raised carries its traceback: drop it
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
      lines = [lines[0], lines[-1]]
    sys.exit(f"error: {' '.join(lines)} (--helpshort lists the flags)")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(_override_error(argv, e))


def main(argv):
  del argv
  verbosity = flags.FLAGS.verbosity
  trainer.setup_logging(verbosity)  # library INFO logs (orbax, absl) only with --verbosity=1
  try:
    config = _CONFIG.value
    config.get("stage")  # a config file that failed to load raises here (config_flags defers the error)
  except Exception as e:  # noqa: BLE001 -- whatever the config file raised, reported as a flag error
    if verbosity >= 1:
      raise
    config_arg = next((a for a in sys.argv[1:] if a.startswith("--config=")), "--config=configs/stage1.py")
    sys.exit(f"error: {config_arg}: cannot load the config file ({cli.one_line(e)})")
  with cli.user_errors(verbosity, extra=(trainer.NonFiniteError,)):
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    workdir = _WORKDIR.value or default_workdir(config.stage, config.preset)
    if distributed.is_main():
      print(f"workdir: {workdir if '://' in workdir else os.path.abspath(workdir)}", flush=True)
    with distributed.reported_by_main():
      results = trainer.train_and_evaluate(config, workdir)
  if distributed.is_main():
    print({k: v for k, v in results.items()})


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
