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
import runpy
import sys
import traceback

from absl import app, flags
from etils import epath
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from depthvlm_jax import cli

if __name__ == "__main__":
  cli.quiet_libraries(sys.argv[1:])  # environment settings, read when jax and transformers are imported

from depthvlm_jax.presets import default_workdir  # noqa: E402
from depthvlm_jax.train import distributed, sizing, trainer  # noqa: E402


def _config_file_arg(argv: list[str]) -> str:
  return next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "configs/stage1.py")


def _unknown_overrides(argv: list[str]) -> list[str]:
  """The `--config.PATH=V` flags whose PATH is not a field of the config file, looked up in the
  config the file builds (an empty list when the file itself cannot be loaded)."""
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  probe = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file("config", _config_file_arg(argv), flag_values=probe, sys_argv=argv[:1])
    probe(argv[:1])
    config = probe["config"].value
  except Exception:  # noqa: BLE001 -- a file that cannot load is reported by the main parse
    return []
  unknown = []
  for flag in overrides:
    try:
      config_path.get_value(flag[len("--config."):], config)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
      unknown.append(flag)
  return unknown


def _override_error(argv: list[str], e: Exception) -> str:
  """One line for a `--config.*` override that cannot apply (e.g. a field the config file lacks)."""
  unknown = _unknown_overrides(argv)
  if unknown:
    hint = ""
    if any(o.startswith(("--config.data.train_files.", "--config.data.eval_files.")) for o in unknown):
      hint = ("; data.train_files / data.eval_files entries cannot be added on the command line: list them in a "
              "config file (a copy of configs/stage1.py with c.data.kind = 'jsonl' and c.data.train_files = "
              "{'NAME': 'ann.jsonl|image_root|depth_root'}) and pass --config=THAT_FILE")
    return (f"error: {' '.join(unknown)}: no such field in the config file {_config_file_arg(argv)}; an override "
            f"must name a field the file defines{hint}")
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  return (f"error: {' '.join(overrides) or '--config'}: cannot apply this override ({type(e).__name__}: "
          f"{cli.one_line(e)})")


def _config_file_error(argv: list[str]) -> str | None:
  """One line when the `--config` file cannot be loaded (missing, or its `get_config` raises); else None.

  The file is loaded here first so that its own exception is reported, not the flag library's
  rendering of it.
  """
  spec = _config_file_arg(argv)
  path, _, arg = spec.partition(":")
  try:
    runpy.run_path(path)["get_config"](*([arg] if arg else []))
  except Exception as e:  # noqa: BLE001 -- whatever the config file raised is the user's to fix
    if cli.verbosity_from_argv(argv) >= 1:
      traceback.print_exc()
    return f"error: --config={spec}: cannot load the config file ({type(e).__name__}: {cli.one_line(e)})"
  return None


if __name__ == "__main__" and (_load_error := _config_file_error(sys.argv)):
  sys.exit(_load_error)
# The config file is read, and the `--config.*` overrides applied, when the flag is defined.
try:
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/stage1.py", "Training configuration file.",
                                            lock_config=True)
except Exception as _e:  # noqa: BLE001 -- an override that cannot apply
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
  """absl's flag parsing; a bad flag or a `--config.*` override that cannot apply is one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # absl's own flag errors name the flag
    sys.exit(f"error: {cli.one_line(e)} (--helpshort lists the flags)")
  except Exception as e:  # noqa: BLE001 -- raised while applying a `--config.*` override
    sys.exit(_override_error(argv, e))


# What a run (or a run killed early) leaves in its workdir.
RUN_ENTRIES = frozenset({"config.json", "checkpoints", "checkpoints_damaged", "frozen_params", "synthetic_data",
                         "metrics.jsonl", "tensorboard", "results.json", "data_counts.json", ".lock",
                         "config.json.tmp"})


def check_workdir(workdir: str) -> None:
  """UserError for a workdir that holds files but nothing a run writes (a folder of unrelated files)."""
  path = epath.Path(workdir)  # a local folder or an object-store prefix (gs://bucket/run)
  if not path.is_dir():
    return
  entries = sorted(p.name for p in path.iterdir())
  if entries and not RUN_ENTRIES.intersection(entries):
    raise cli.UserError(f"--workdir={workdir}: holds {len(entries)} entries (e.g. {', '.join(entries[:3])}) and no "
                        "training run; give a new or empty folder, or the workdir of the run to resume")


def main(argv):
  del argv
  verbosity = flags.FLAGS.verbosity
  trainer.setup_logging(verbosity)  # library INFO logs (orbax, absl) only with --verbosity=1
  if verbosity < 1:
    cli.quiet_library_loggers()
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
    check_workdir(workdir)
    sizing.enable_compile_cache(config.compile_cache_dir)
    if distributed.is_main():
      print(f"workdir: {workdir if '://' in workdir else os.path.abspath(workdir)}", flush=True)
    with distributed.reported_by_main():
      results = trainer.train_and_evaluate(config, workdir)
  if distributed.is_main():
    print(trainer.summary(results, workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
