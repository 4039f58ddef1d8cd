"""How the command-line tools report user errors: one line on stderr, exit status 1, no traceback.

A user error is an exception whose message already names the file, field or flag at fault and what
was expected (bad config values, unreadable inputs, a locked workdir, a refused `--out`, ...). The
CLIs (`main.py`, `predict`, `evaluate`, `export`) run their work inside `user_errors(...)`; with
`--verbosity=1` (or higher) the traceback is printed too, for bug reports.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import tempfile
import traceback
import uuid
from typing import Iterator, Sequence


def user_error_types() -> tuple[type[BaseException], ...]:
  """The exception types whose message is meant for the user (imported lazily: no import cycles)."""
  from data_pipelines.rgbd import RecordError, SampleError
  from data_pipelines.skips import SourceExhaustedError
  from depthvlm_jax.evaluation.loading import ModelLoadError
  from depthvlm_jax.evaluation.protocol import FrameError
  from depthvlm_jax.model.config import ConfigError
  from depthvlm_jax.model.hf_checkpoint import CheckpointError
  from depthvlm_jax.model.hf_params import KeyMapError
  from depthvlm_jax.processing.tokenizer import TokenizerError
  from depthvlm_jax.runs.checkpoints import NoIntactCheckpointError
  from depthvlm_jax.runs.freeze import FreezeRuleError
  from depthvlm_jax.train.workdir_lock import WorkdirLockedError
  return (ConfigError, CheckpointError, KeyMapError, ModelLoadError, FrameError, TokenizerError, FreezeRuleError,
          RecordError, SampleError, SourceExhaustedError, NoIntactCheckpointError, WorkdirLockedError,
          FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
          json.JSONDecodeError, UserError)


class UserError(ValueError):
  """A refused request whose message names the flag or file and what was expected."""


def one_line(e: BaseException) -> str:
  """The exception's message on one line (a multi-line message's lines joined with '; ')."""
  text = str(e) or type(e).__name__
  if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
    text = f"{e.filename}: {text}"
  out = ""
  for part in (p.strip() for p in text.splitlines() if p.strip()):
    out += part if not out else (" " if out.endswith(":") else "; ") + part
  return out


def verbosity_from_argv(argv: list[str]) -> int:
  """The value of `--verbosity=N` / `--verbosity N` in `argv` (0 when absent or not a number)."""
  for i, a in enumerate(argv):
    value = a.split("=", 1)[1] if a.startswith("--verbosity=") else (
        argv[i + 1] if a == "--verbosity" and i + 1 < len(argv) else None)
    if value is not None:
      try:
        return int(value)
      except ValueError:
        return 0
  return 0


@contextlib.contextmanager
def user_errors(verbosity: int = 0, extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
  """Turns a user error raised inside into `error: MESSAGE` on stderr and exit status 1.

  Args:
    verbosity: >= 1 also prints the traceback.
    extra: more exception types to treat as user errors (a CLI's own error class).
  """
  try:
    yield
  except user_error_types() + tuple(extra) as e:
    if verbosity >= 1:
      traceback.print_exc()
    sys.stderr.write(f"error: {one_line(e)}\n")
    sys.stderr.flush()
    raise SystemExit(1) from None


def parse_flags(flag_values, argv: Sequence[str] | None, prog: str, doc: str) -> list[str]:
  """Parses `argv` (default: sys.argv[1:]) into `flag_values` after resetting every flag to its default.

  `--help` / `-h` prints `doc` and the flags and exits 0; a bad or missing flag is one `error:` line
  on stderr and exit status 1. Returns the positional arguments.
  """
  from absl import flags
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv):
    print(f"{doc.strip()}\n\nflags:\n{flag_values.get_help()}")
    raise SystemExit(0)
  flag_values.unparse_flags()
  try:
    return flag_values([prog, *argv])[1:]
  except flags.Error as e:
    sys.stderr.write(f"error: {one_line(e)} ({prog} --help lists the flags)\n")
    sys.stderr.flush()
    raise SystemExit(1) from None


def check_output_dir(path: str | pathlib.Path, flag: str) -> None:
  """UserError unless `path` is a directory this process can write in, or can be created as one.

  Checked by creating (and removing) a file in `path` or in its nearest existing parent, so a
  read-only file system or folder is refused before a model is loaded; nothing is left behind. An
  object-store prefix (`gs://bucket/dir`) is checked the same way, with a small object under it.
  """
  if "://" in str(path):
    _check_output_prefix(str(path), flag)
    return
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag}={path}: exists and is not a directory")
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise UserError(f"{flag}={path}: {existing} is a file, so the directory cannot be created")
  try:
    with tempfile.TemporaryFile(dir=existing, prefix=".write_check"):
      pass
  except OSError as e:
    where = "" if existing == path else f" (its nearest existing parent {existing} is not writable)"
    raise UserError(f"{flag}={path}: cannot write there{where}: {e.strerror or type(e).__name__}") from None


def _check_output_prefix(path: str, flag: str) -> None:
  from etils import epath
  probe = epath.Path(path) / f".write_check.{uuid.uuid4().hex}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except Exception as e:  # noqa: BLE001 -- each store's client raises its own errors (gcsfs: OSError, HttpError, ...)
    raise UserError(f"{flag}={path}: cannot write there: {type(e).__name__}: {one_line(e)}") from None


# Loggers of libraries that report routine work (checkpoint reads and writes, compiles) or
# harmless notices (orbax's "Metadata file does not exist").
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "grain", "tensorboardX", "urllib3", "filelock", "transformers")


def quiet_libraries(argv: Sequence[str]) -> None:
  """Keeps library start-up noise off the terminal unless `--verbosity` >= 1 is in `argv`.

  Call before jax or transformers are imported: the settings are environment variables read then.
  XLA's C++ logging drops to errors; transformers' advisory notices ("PyTorch was not found") are
  off; on a host without TPU chips, and without a GPU plugin, JAX is pointed at the CPU so that an
  installed libtpu does not start (and print its hostname errors). Settings already in the
  environment are kept.
  """
  if verbosity_from_argv(list(argv)) >= 1:
    return
  import os
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  if "JAX_PLATFORMS" not in os.environ and not _tpu_chips_present() and not _gpu_plugin_installed():
    os.environ["JAX_PLATFORMS"] = "cpu"
  quiet_library_loggers()


def quiet_library_loggers() -> None:
  """Library loggers at ERROR (our own loggers keep their levels)."""
  import logging
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(logging.ERROR)


def _tpu_chips_present() -> bool:
  """Whether the host shows TPU devices (the device files JAX itself looks for)."""
  import glob
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _gpu_plugin_installed() -> bool:
  from importlib import metadata
  names = {d.metadata["Name"].lower() for d in metadata.distributions() if d.metadata["Name"]}
  return any(n.startswith(("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")) for n in names)
