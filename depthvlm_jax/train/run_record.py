"""What a run records in its workdir: `config.json` (and which changes a resumed run may make) and `results.json`."""

from __future__ import annotations

import json
import logging
import math
import pathlib
from typing import Any

from etils import epath
from flax.traverse_util import flatten_dict

from depthvlm_jax.model.config import ConfigError

log = logging.getLogger(__name__)

# Settings a resumed run may not change: they define the parameter and optimizer-state trees (or
# the stage's meaning), so the checkpoints of the workdir would not fit them.
FIXED_ON_RESUME = ("stage", "model.", "train.trainable", "train.lora_")


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """(dotted key, old value, new value) for every setting that differs (JSON forms compared)."""
  a, b = flatten_dict(old, sep="."), flatten_dict(new, sep=".")
  missing = object()
  return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)]


def _show(v: Any) -> str:
  return "(absent)" if not isinstance(v, (str, int, float, list, dict, bool, type(None))) else json.dumps(v)


def read_workdir_config(workdir: pathlib.Path) -> dict[str, Any] | None:
  """The recorded config of the run in `workdir` (None if absent); ConfigError naming the file if invalid."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not valid JSON ({e}); it records this workdir's run: restore it, or delete it "
                      "to record the current config") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: expected a JSON object (the run's config), got {type(data).__name__}")
  return data


def check_resume_config(previous: dict[str, Any] | None, config, workdir: pathlib.Path) -> list[str]:
  """Refuses (ConfigError with the diff) a config whose fixed settings differ from the workdir's run.

  Returns "key: old -> new" lines of the other, allowed changes (schedule, steps, logging, ...).
  """
  if previous is None:
    return []
  # runs recorded before `model.frozen_dtype` existed kept their frozen parameters in float32
  previous = dict(previous, model={"frozen_dtype": "float32", **previous.get("model", {})})
  # runs recorded before LoRA existed fine-tuned fully (rank 0; the other two settings then act on nothing)
  if "lora_rank" not in previous.get("train", {}):
    t = config.train
    previous = dict(previous, train={"lora_rank": 0, "lora_alpha": t.lora_alpha, "lora_targets": t.lora_targets,
                                     **previous.get("train", {})})
  diff = config_diff(previous, json.loads(config.to_json_best_effort()))
  lines = [f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in diff]
  fixed = [line for (k, _, _), line in zip(diff, lines) if k == "stage" or k.startswith(FIXED_ON_RESUME)]
  if fixed:
    raise ConfigError(f"{workdir / 'config.json'}: the checkpoints in this workdir were trained with another "
                      f"config; changed: {'; '.join(fixed)}. Use a new --workdir (with --config.model_init="
                      f"{workdir} to start from this run's parameters) or the settings recorded there")
  return lines


def _json_safe(obj: Any, path: str, flagged: list[str]) -> Any:
  if isinstance(obj, float) and not math.isfinite(obj):
    flagged.append(path)
    return None
  if isinstance(obj, dict):
    return {k: _json_safe(v, f"{path}.{k}" if path else str(k), flagged) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v, f"{path}[{i}]", flagged) for i, v in enumerate(obj)]
  return obj


def write_atomic(path, text: str) -> None:
  """Writes `text` to `path` (local or object store) through a temporary file beside it, so a reader
  sees the old or the new file, never a partial one."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)  # a rename locally; a copy and delete on an object store, whose writes are whole objects anyway


def write_results(path: pathlib.Path, results: dict[str, Any]) -> None:
  """results.json as strict JSON: a non-finite number becomes null and its key is listed in `nonfinite`."""
  flagged: list[str] = []
  safe = _json_safe(results, "", flagged)
  if flagged:
    safe["nonfinite"] = flagged
    log.warning("results.json: non-finite values written as null: %s", ", ".join(flagged))
  write_atomic(path, json.dumps(safe, indent=2, allow_nan=False))


DATA_COUNTS_FILE = "data_counts.json"


def write_data_counts(workdir: pathlib.Path, step: int, sources: list[str], skipped: Any, drawn: Any,
                      keep_steps: set[int]) -> None:
  """Records the run's cumulative sample counts (drawn and skipped per source) at checkpoint `step`.

  They are not part of the train state, so a resumed run reads them back from here
  (`read_data_counts`); entries of steps not in `keep_steps` (checkpoints already deleted) are dropped.
  """
  path = epath.Path(workdir) / DATA_COUNTS_FILE
  try:
    steps = json.loads(path.read_text())["steps"] if path.exists() else {}
  except (ValueError, KeyError, TypeError):
    steps = {}
  steps = {k: v for k, v in steps.items() if int(k) in keep_steps}
  steps[str(step)] = {"sources": list(sources), "skipped": [[int(x) for x in row] for row in skipped],
                      "drawn": [int(x) for x in drawn]}
  write_atomic(path, json.dumps({"steps": steps}))


def read_data_counts(workdir: pathlib.Path, step: int, sources: list[str]) -> tuple[Any, Any] | None:
  """(skipped (S, R), drawn (S,)) recorded at checkpoint `step` for these sources, or None."""
  import numpy as np
  path = epath.Path(workdir) / DATA_COUNTS_FILE
  try:
    entry = json.loads(path.read_text())["steps"][str(step)]
    if entry["sources"] != list(sources):
      return None
    return np.asarray(entry["skipped"], np.int64), np.asarray(entry["drawn"], np.int64)
  except (OSError, ValueError, KeyError, TypeError):
    return None
