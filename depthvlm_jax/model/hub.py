"""Model directories named by Hugging Face hub id: `org/name` or `org/name@revision` -> a local folder.

`resolve_model_dir(value)` returns `value` unchanged when it is an existing local path (a folder named
like an id, `runs/stage1` say, is always the local one), and otherwise, when it has the form of a hub
id, the snapshot folder `huggingface_hub.snapshot_download` returns: files already in the hub cache
(`HF_HUB_CACHE`, `HF_HOME`) are not fetched again, and with `HF_HUB_OFFLINE=1` only the cache is read.
Any other value comes back unchanged, for the caller to report as a missing directory.
"""

from __future__ import annotations

import os
import pathlib
import re

from depthvlm_jax.model.hf_checkpoint import CheckpointError

# `namespace/name` as the hub spells repository ids, then an optional `@branch`, `@tag` or `@commit`.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.][\w./-]*))?")
# Weights of other frameworks that some model repositories also hold; never read here.
IGNORED_FILES = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.gguf", "*.mlmodel"]


class HubError(CheckpointError):
  """A hub id that cannot be resolved to a local folder (the message names the id and why)."""


def parse_hub_id(value: str) -> tuple[str, str | None] | None:
  """(repo id, revision or None) when `value` has the form `org/name[@revision]`, else None."""
  m = _HUB_ID.fullmatch(str(value))
  if m is None or ".." in m["repo"] or m["repo"].endswith("."):
    return None
  return m["repo"], m["revision"]


def resolve_model_dir(value: str | os.PathLike) -> str:
  """A local path for `value`: itself when it exists, the hub snapshot folder for a hub id (see the
  module docstring); HubError naming the id when the hub cannot provide it."""
  value = os.fspath(value)
  if not value or pathlib.Path(value).expanduser().exists():
    return value
  parsed = parse_hub_id(value)
  if parsed is None:
    return value
  repo, revision = parsed
  import huggingface_hub
  from huggingface_hub import constants, errors
  where = f"{value}: no such local directory, and as a hub id"
  try:
    return huggingface_hub.snapshot_download(repo, revision=revision, ignore_patterns=IGNORED_FILES)
  except errors.IncompleteSnapshotError as e:
    raise HubError(f"{where}: the cached snapshot is incomplete and the hub cannot be reached ({_first_line(e)})")
  except errors.LocalEntryNotFoundError as e:
    if constants.HF_HUB_OFFLINE:
      raise HubError(f"{where}: not in the hub cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is "
                     "set; download it once with network access (unset HF_HUB_OFFLINE) or pass a local "
                     "directory") from None
    raise HubError(f"{where}: not in the hub cache and the hub cannot be reached ({_first_line(e)})") from None
  except errors.RevisionNotFoundError:
    raise HubError(f"{where}: the repository has no revision {revision!r} (a branch, tag or commit)") from None
  except errors.RepositoryNotFoundError:
    raise HubError(f"{where}: no such model repository on the hub (a private or gated one needs "
                   "`hf auth login` or HF_TOKEN)") from None
  except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as e:
    raise HubError(f"{where}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else type(e).__name__
