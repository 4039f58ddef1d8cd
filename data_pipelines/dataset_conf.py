"""The authors' dataset files (`configs/eval_datasets.conf`, `configs/train_datasets.conf`), read as data.

Their scripts `source` these shell files; here they are parsed, never run. Each file sets, per
dataset NAME, the variables

  NAME_JSONL    annotation file
  NAME_IMAGE    image root
  NAME_DEPTH    depth root
  NAME_SAMPLES  evaluate only the first N records (0 or unset: all)

and may set a default list (`EVAL_DATASETS="A B ..."`, `TRAIN_DATASETS=...`). Values may refer to
variables set earlier in the file or in the environment (`${ANNO_ROOT}`, `$X`, `${X:-default}`);
relative paths are taken from `root` (the directory the authors' scripts run in). Only the variable
assignments are read (each line split with `shlex`); function definitions and other commands are
skipped, and a command substitution `$(...)` is refused (nothing is executed).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
from typing import Mapping, Sequence

from data_pipelines.rgbd import DATASET_DEPTH_RANGES
from depthvlm_jax.model.config import ConfigError

SUFFIXES = ("JSONL", "IMAGE", "DEPTH", "SAMPLES")
# The authors' dataset names whose depth-range/crop kind is spelled differently here.
KIND_OF_NAME = {"ARGOVERSE2": "argoverse", "IBIMS1": "ibims", "MATTERPORT3D": "matterport"}

_ASSIGNMENT = re.compile(r"(?:export\s+|readonly\s+|declare\s+(?:-\w+\s+)*)?([A-Za-z_]\w*)=")
_FUNCTION = re.compile(r"(?:function\s+[A-Za-z_][\w-]*(?:\s*\(\s*\))?|[A-Za-z_][\w-]*\s*\(\s*\))\s*\{?\s*$")
_REFERENCE = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::?-([^}]*))?\}|([A-Za-z_]\w*))")


class DatasetConfError(ConfigError):
  """A dataset file that cannot be used; the message names the file and the variable."""


@dataclasses.dataclass(frozen=True)
class ConfDataset:
  """One dataset of a conf file: its NAME, resolved paths, record limit (0 = all) and depth kind."""

  name: str
  jsonl: str
  image_root: str
  depth_root: str
  samples: int
  kind: str


def read_variables(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """The shell variables the file assigns, in order, with references to earlier ones expanded."""
  path = pathlib.Path(path)
  try:
    text = path.read_text()
  except OSError as e:
    raise DatasetConfError(f"{path}: cannot read the dataset file ({e.strerror or e})") from None
  environ = os.environ if environ is None else environ
  values: dict[str, str] = {}
  in_function, opened, depth = False, False, 0  # skipping a function body: its brace depth
  lines = text.replace("\\\n", "").splitlines()
  i = 0
  while i < len(lines):
    number, raw = i + 1, lines[i]
    i += 1
    line = raw.strip()
    if _FUNCTION.match(line) and not in_function:
      in_function, opened, depth = True, False, 0
    if in_function:
      opened, depth = opened or "{" in line, depth + line.count("{") - line.count("}")
      in_function = not (opened and depth <= 0)
      continue
    if not line or line.startswith("#") or not _ASSIGNMENT.match(line):
      continue  # a command the scripts would run (echo, if, ...): nothing to read
    while True:
      try:
        words = shlex.split(line, comments=True)
        break
      except ValueError as e:  # a quoted value that goes on over the next lines
        if i == len(lines):
          raise DatasetConfError(f"{path}:{number}: cannot split {line!r} ({e})") from None
        line, raw, i = line + "\n" + lines[i], raw + "\n" + lines[i], i + 1
    words = [w for w in words if w not in ("export", "readonly", "declare") and not w.startswith("-")]
    for word in words:
      name, sep, value = word.partition("=")
      if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name):
        break  # the assignments prefix a command: `X=1 cmd` sets X for that command only
      if "$(" in value or "`" in value:
        raise DatasetConfError(f"{path}:{number}: {name} uses a command substitution, which is not run; "
                               "write the value out")
      if not _single_quoted(raw, name):
        value = _expand(value, values, environ, f"{path}:{number}: {name}")
      values[name] = value
  return values


def _single_quoted(raw: str, name: str) -> bool:
  rest = raw.split(f"{name}=", 1)[1] if f"{name}=" in raw else ""
  return rest.startswith("'")


def _expand(value: str, values: Mapping[str, str], environ: Mapping[str, str], where: str) -> str:
  def one(m: re.Match) -> str:
    name = m.group(1) or m.group(3)
    if name in values:
      return values[name]
    if name in environ:
      return environ[name]
    if m.group(2) is not None:
      return m.group(2)
    raise DatasetConfError(f"{where} refers to ${{{name}}}, which is set neither earlier in the file nor in "
                           "the environment")
  return _REFERENCE.sub(one, value)


def conf_datasets(path: str | os.PathLike, names: str | Sequence[str] | None = None,
                  root: str | os.PathLike = ".", list_variable: str = "EVAL_DATASETS",
                  environ: Mapping[str, str] | None = None) -> list[ConfDataset]:
  """The datasets `names` (space- or comma-separated; None or "": the file's `list_variable`) of
  the file, their paths taken from `root` when relative, every file and folder checked.

  Raises DatasetConfError naming the variable: an unknown name, an unset `NAME_JSONL`/`_IMAGE`/
  `_DEPTH`, a `NAME_SAMPLES` that is not a count, a path that does not exist.
  """
  values = read_variables(path, environ)
  if isinstance(names, str) or names is None:
    text = names or ""
    if not text.strip():
      if list_variable not in values:
        raise DatasetConfError(f"{path}: no dataset names given and the file sets no {list_variable}")
      text = values[list_variable]
    names = text.replace(",", " ").split()
  if not names:
    raise DatasetConfError(f"{path}: the list of datasets is empty")
  defined = sorted({k.rsplit("_", 1)[0] for k in values if k.endswith(tuple(f"_{s}" for s in SUFFIXES))})
  root = pathlib.Path(root)
  out = []
  for name in names:
    key = name.upper()
    if key not in defined:
      raise DatasetConfError(f"{path}: unknown dataset {name!r} ({key}_JSONL is not set); the file defines "
                             f"{', '.join(defined) or 'none'}")
    paths = {}
    for suffix in ("JSONL", "IMAGE", "DEPTH"):
      var = f"{key}_{suffix}"
      if not values.get(var):
        raise DatasetConfError(f"{path}: {var} is not set (needed for dataset {key})")
      p = pathlib.Path(values[var]).expanduser()
      p = p if p.is_absolute() else root / p
      want_file = suffix == "JSONL"
      if not (p.is_file() if want_file else p.is_dir()):
        raise DatasetConfError(f"{path}: {var}={values[var]!r}: {'file' if want_file else 'directory'} {p} not "
                               f"found (relative paths are taken from {root})")
      paths[suffix] = str(p)
    var = f"{key}_SAMPLES"
    raw = values.get(var, "") or "0"
    if not re.fullmatch(r"\d+", raw.strip()):
      raise DatasetConfError(f"{path}: {var}={raw!r}: expected a number of records (0 = all)")
    kind = KIND_OF_NAME.get(key, key.lower())
    out.append(ConfDataset(key.lower(), paths["JSONL"], paths["IMAGE"], paths["DEPTH"], int(raw),
                           kind if kind in DATASET_DEPTH_RANGES else ""))
  if len({d.name for d in out}) != len(out):
    raise DatasetConfError(f"{path}: a dataset is listed twice in {' '.join(names)}")
  return out


def apply_to_train_config(config) -> None:
  """Adds `data.datasets` of the file `data.datasets_conf` (default list: its TRAIN_DATASETS) to
  `data.train_files` as "jsonl|image|depth|kind" entries, paths from `data.datasets_root` ("" = the
  current directory). Nothing happens when `data.datasets_conf` is "". Raises DatasetConfError
  naming the setting or the variable."""
  data = config.data
  if not data.datasets_conf:
    return
  if data.kind != "jsonl":
    raise DatasetConfError(f"data.datasets_conf={data.datasets_conf!r} needs data.kind='jsonl' "
                           f"(it is {data.kind!r})")
  try:
    found = conf_datasets(data.datasets_conf, data.datasets, data.datasets_root or ".", "TRAIN_DATASETS")
  except DatasetConfError as e:
    raise DatasetConfError(f"data.datasets_conf: {e}") from None
  entries = {}
  for d in found:
    if d.samples:
      raise DatasetConfError(f"data.datasets_conf: {data.datasets_conf}: {d.name.upper()}_SAMPLES={d.samples}: "
                             "training reads every record (set it to 0; data.train_weights sets the mixture)")
    if d.name in data.train_files and data.train_files[d.name] != _entry(d):
      raise DatasetConfError(f"data.train_files.{d.name} is set and data.datasets_conf names {d.name.upper()} "
                             "too; keep one of them")
    entries[d.name] = _entry(d)
  with config.unlocked():
    for name, entry in entries.items():
      data.train_files[name] = entry


def _entry(d: ConfDataset) -> str:
  return "|".join([d.jsonl, d.image_root, d.depth_root] + ([d.kind] if d.kind else []))
