"""How the command-line tools report user errors: one line on stderr, exit status 1, no traceback.

A user error is an exception whose message already names the file, field or flag at fault and what
was expected (bad config values, unreadable inputs, a locked workdir, a refused `--out`, ...). The
CLIs (`main.py`, `predict`, `evaluate`, `export`) run their work inside `user_errors(...)`; with
`--verbosity=1` (or higher) the traceback is printed too, for bug reports.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from typing import Iterator


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
