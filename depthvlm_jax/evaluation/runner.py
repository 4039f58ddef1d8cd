"""The evaluation loop: datasets -> planned items -> loaded samples -> predictor -> per-image
metrics, appended to `per_image.jsonl` after every batch (a rerun with the same settings resumes),
then the summary (`report.py`) in `results.json`.

Every file is read and written through `etils.epath`, so annotation files, images, depth maps and the
output directory may be local or on an object store (`gs://bucket/...`). Objects cannot be appended
to: there `per_image.jsonl` is kept in memory and rewritten whole at most every
`REWRITE_EVERY_S` seconds, after the last batch and when the run stops on an error; a killed run
resumes from what the last rewrite holds. A local file is appended to after every batch.

Images are read by a thread pool under the protocol's conventions (`protocol.py`); every fault of one
record becomes a counted, reported skip, never a stopped run. Predictors (`predictors.py`) are
called with batches of one processed size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tqdm
from etils import epath

from data_pipelines import dataset_conf, rgbd
from depthvlm_jax.evaluation import protocol
from depthvlm_jax.evaluation.report import RESULTS_FILE, format_table, line_of, summarize
from depthvlm_jax.processing.image_processor import PREPROCESSING

SUMMARY_FILE = "results.json"
RUN_FILE = "run.json"
REWRITE_EVERY_S = 30.0  # per_image.jsonl on an object store: the longest stretch of results a kill loses


class EvalConfigError(ValueError):
  """Bad evaluation settings (message names the setting and what was expected)."""


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """One annotation file with its roots; `kind` picks depth range and crop."""

  name: str
  jsonl: str
  image_root: str
  depth_root: str = ""
  kind: str = ""
  coord_frame: str | None = None  # frame of pixel_coords for "correct" mode (None: see protocol.py)
  samples: int = 0  # evaluate only the first `samples` records (0: all)

  @property
  def dataset_kind(self) -> str:
    return self.kind or self.name


def parse_dataset(value: str, coord_frames: dict[str, str] | None = None) -> EvalDataset:
  """"NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]" -> EvalDataset."""
  if "=" not in value:
    raise EvalConfigError(f"--data {value!r}: expected NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]")
  name, rest = value.split("=", 1)
  parts = rest.split("|")
  if not 2 <= len(parts) <= 4 or not name:
    raise EvalConfigError(f"--data {value!r}: expected NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]")
  jsonl, image_root, depth_root, kind = (parts + ["", ""])[:4]
  if (kind or name) not in rgbd.DATASET_DEPTH_RANGES:
    known = ", ".join(sorted(rgbd.DATASET_DEPTH_RANGES))
    what = f"KIND {kind!r} is not a known dataset" if kind else (
        f"{name!r} is not a known dataset name and no KIND is given (the name is the kind by default)")
    raise EvalConfigError(f"--data {value!r}: {what}; append |KIND with one of: {known} (it sets the depth range "
                          "and crop)")
  return EvalDataset(name, jsonl, image_root, depth_root or image_root, kind,
                     (coord_frames or {}).get(name))


def datasets_from_conf(path: str, names: str | None, root: str = ".",
                       coord_frames: dict[str, str] | None = None) -> list[EvalDataset]:
  """The datasets `names` of the authors' `eval_datasets.conf` (`data_pipelines.dataset_conf`);
  None or "" = its EVAL_DATASETS. Named by the lower-case variable prefix (NYUV2 -> nyuv2)."""
  try:
    found = dataset_conf.conf_datasets(path, names, root, "EVAL_DATASETS")
  except dataset_conf.DatasetConfError as e:
    raise EvalConfigError(f"--datasets_conf: {e}") from None
  return [EvalDataset(d.name, d.jsonl, d.image_root, d.depth_root, d.kind, (coord_frames or {}).get(d.name),
                      d.samples) for d in found]


@dataclasses.dataclass
class Item:
  """One image to evaluate: its key, dataset, record and (once loaded) canonical sample."""

  key: str
  dataset: EvalDataset
  record: rgbd.RGBDRecord
  frame: protocol.FrameChoice | None = None
  sample: rgbd.CanonicalSample | None = None
  sparse_gt: np.ndarray | None = None  # official: the sparse GT map when masks made them differ
  empty: bool = False  # official: GT without a valid pixel, counted as δ1 = 0 without a prediction
  skip: tuple[str, str] | None = None  # (reason, message) decided while planning


def planned_canonical_hw(item: Item) -> tuple[int, int]:
  """(H, W) the canonical sample of a record will have, from the record (or the image header)."""
  r = item.record
  if r.canonical_size is not None:
    w, h = r.canonical_size
  else:
    size = r.original_rgb_size or protocol.frame_size(r, "rgb", item.dataset.image_root, item.dataset.depth_root)
    if r.original_fx is None:
      return size[1], size[0]
    w, h = rgbd.canonical_size(size, r.original_fx, r.canonical_fx)
  if item.dataset.dataset_kind in rgbd.CENTRE_CROP_1024:
    w, h = min(w, 1024), min(h, 1024)
  return h, w


def _read_results(path: epath.Path) -> dict[str, dict]:
  """Per-image lines by key; a torn last line (killed mid-write) is cut off so appends stay valid."""
  if not path.exists():
    return {}
  raw = path.read_bytes()
  if raw and not raw.endswith(b"\n"):
    raw = raw[:raw.rfind(b"\n") + 1]
    path.write_bytes(raw)
  out = {}
  for line in raw.decode().splitlines():
    if line.strip():
      row = json.loads(line)
      out[row["key"]] = row
  return out


def _raw_frames(path: str) -> dict[int, str | None]:
  """Line number -> the optional `pixel_coords_frame` field of each JSON line."""
  out = {}
  with epath.Path(path).open() as f:
    for n, line in enumerate(f, 1):
      try:
        obj = json.loads(line) if line.strip() else None
      except json.JSONDecodeError:
        obj = None
      if isinstance(obj, dict) and obj.get(protocol.FRAME_FIELD) is not None:
        out[n] = obj[protocol.FRAME_FIELD]
  return out


def plan(datasets: Sequence[EvalDataset], modes: Sequence[str], protocol_name: str,
         limit: int | None = None) -> tuple[list[Item], dict[str, list[str]]]:
  """All items of all datasets and each dataset's rejected JSON lines (messages with file:line).

  Coordinate frames are chosen now; a record whose frame cannot be decided (correct protocol) gets a
  `skip` and is reported like any other skipped record. Only settings errors raise.
  """
  conv = protocol.conventions(protocol_name)
  items, bad = [], {}
  for ds in datasets:
    if not epath.Path(ds.jsonl).exists():
      raise EvalConfigError(f"dataset {ds.name!r}: annotation file {ds.jsonl} not found")
    records, errors = rgbd.read_jsonl(ds.jsonl)
    bad[ds.name] = [str(e) for e in errors]
    frames = _raw_frames(ds.jsonl)
    n = min(x for x in (limit, ds.samples or None, len(records)) if x is not None)
    for r in records[:n]:
      line = line_of(r.source)
      item = Item(f"{ds.name}:{line}:{r.image}", ds, r)
      if "sparse" in modes and protocol.has_sparse(r, conv):
        try:
          frame, why = protocol.choose_frame(r, protocol_name, ds.dataset_kind, frames.get(line), ds.coord_frame)
          item.frame = protocol.FrameChoice(frame, why, (0, 0))
        except protocol.FrameError as e:
          item.skip = ("bad_coordinates", str(e))
      items.append(item)
  return items, bad


def _with_source(record: rgbd.RGBDRecord, message: str) -> str:
  return message if message.startswith(record.source) else f"{record.source}: {message}"


def _check_depth_size(record: rgbd.RGBDRecord, ds: EvalDataset) -> None:
  """SampleError when a PNG depth map's size differs from the record's `original_depth_size`: its pixels
  then cannot be matched to the image (resizing it anyway would score a different scene geometry)."""
  if record.original_depth_size is None or record.depth_path is None or record.depth_format != "png":
    return
  path = rgbd.resolve_path(ds.depth_root, record.depth_path)
  if not path.exists():
    return  # reported as missing_depth by the loader
  w, h = _png_size(path)
  want_w, want_h = record.original_depth_size
  if (w, h) != (want_w, want_h):
    raise rgbd.SampleError("corrupt_depth", f"{record.source}: depth map {path} is {w}x{h} pixels but the record "
                           f"declares original_depth_size {want_w}x{want_h}")


def _png_size(path: epath.Path) -> tuple[int, int]:
  from PIL import Image
  with path.open("rb") as f, Image.open(f) as im:
    return im.size


def _load(item: Item, conv: protocol.Conventions) -> Item | rgbd.SampleError:
  """Reads one item under the protocol; every fault of the record becomes a `SampleError`."""
  ds, r = item.dataset, item.record
  if item.skip is not None:
    return rgbd.SampleError(*item.skip)
  try:
    if conv.name == "official" and r.canonical_size is None:
      raise rgbd.SampleError("bad_record", f"{r.source}: the official protocol needs canonical_size (the authors' "
                             "evaluator then skips the focal-length resize, which is not reproduced here)")
    if item.frame is not None and conv.coords == "official" and r.original_rgb_size is None:
      raise rgbd.SampleError("bad_record", f"{r.source}: the official protocol needs original_rgb_size to scale "
                             "pixel_coords")
    _check_depth_size(r, ds)
    load = functools.partial(rgbd.load_sample, r, ds.image_root, ds.depth_root, ds.dataset_kind,
                             nearest_rule=conv.nearest_rule, default_depth_scale=conv.default_depth_scale,
                             exif_transpose=conv.exif_transpose)
    try:
      item.sample = load()
    except rgbd.SampleError as e:
      if e.reason == "no_valid_depth" and conv.empty_counts_zero:
        item.empty = True
        return item
      raise
    if item.frame is not None:
      size = tuple(protocol.frame_size(r, item.frame.frame, ds.image_root, ds.depth_root))
      if conv.strict_coords:
        protocol.check_coordinates(r, item.frame.frame, size)
      item.frame = dataclasses.replace(item.frame, size=size)
      if not conv.sparse_masks and (r.mask_valid_path or r.mask_transp_path):
        item.sparse_gt = load(masks=False).depth
  except rgbd.SampleError as e:
    return rgbd.SampleError(e.reason, _with_source(r, str(e)))
  except protocol.FrameError as e:
    return rgbd.SampleError("bad_coordinates", _with_source(r, str(e)))
  except (OSError, ValueError) as e:  # e.g. an image header that cannot be read for the frame size
    return rgbd.SampleError("unreadable_image", _with_source(r, f"{type(e).__name__}: {e}"))
  except Exception as e:  # noqa: BLE001 -- one record's fault must not stop the run; it is reported
    return rgbd.SampleError("other", _with_source(r, f"{type(e).__name__}: {e}"))
  return item


class _ResultsWriter:
  """Adds lines to `per_image.jsonl`: appended to a local file; on an object store the whole object is
  rewritten (earlier lines kept), at most every `REWRITE_EVERY_S` seconds and at `close`."""

  def __init__(self, path: epath.Path):
    self.path, self.every_s = path, REWRITE_EVERY_S
    self.local = rgbd.is_local(path)
    self.lines: list[str] = []
    self.written = time.monotonic()
    self.pending = False
    if self.local:
      self.file = path.open("a")
    elif path.exists():  # `_read_results` has cut a torn last line off
      self.lines = [path.read_text()]

  def add(self, text: str) -> None:
    if self.local:
      self.file.write(text)
      self.file.flush()
      return
    self.lines.append(text)
    self.pending = True
    if time.monotonic() - self.written >= self.every_s:
      self._rewrite()

  def _rewrite(self) -> None:
    self.path.write_text("".join(self.lines))
    self.written, self.pending = time.monotonic(), False

  def close(self) -> None:
    if self.local:
      self.file.close()
    elif self.pending:
      self._rewrite()


def _batches(items: Sequence[Item], predictor, batch_size: int, conv: protocol.Conventions) -> Iterable[list[Item]]:
  groups = collections.defaultdict(list)
  for it in items:
    try:
      key = predictor.bucket(it, conv)
    except Exception:  # noqa: BLE001 -- a record whose size cannot be planned is reported when it is loaded
      key = None
    groups[key].append(it)
  for group in groups.values():
    for s in range(0, len(group), batch_size):
      yield group[s:s + batch_size]


def _signature(ds: EvalDataset) -> dict[str, Any]:
  """The dataset's settings as `run.json` records them (`samples` only when it limits the records)."""
  out = dataclasses.asdict(ds)
  if not ds.samples:
    del out["samples"]
  return out


def run(predictor, datasets: Sequence[EvalDataset], out_dir: str | pathlib.Path | epath.Path,
        modes: Sequence[str] = protocol.MODES, protocol_name: str = "correct", batch_size: int = 8,
        limit: int | None = None, workers: int = 4, progress: bool = True,
        after_batch: Callable[[int], None] | None = None, preprocessing: str | None = None) -> dict[str, Any]:
  """Evaluates `predictor` on `datasets`, resuming from `out_dir`; returns the summary dict.

  Args:
    predictor: `ModelPredictor(load_model(path))`, `ConstantDepth(2.0)` or `GroundTruth()`.
    datasets: the annotation files.
    out_dir: where per_image.jsonl / results.json / run.json live (created; local or e.g. gs://).
    modes: subset of ("sparse", "dense").
    protocol_name: "official" | "correct" (`evaluation.protocol.CONVENTIONS`).
    batch_size: images per predictor call (a model rounds it up to the mesh's data-parallel size).
    limit: evaluate only the first `limit` records of each file (and of a dataset's `samples`).
    workers: threads that read and focal-unify images.
    after_batch: called with the number of finished images after each batch (progress hooks, tests).
    preprocessing: override the protocol's image preprocessing ("official" | "direct").

  Returns:
    {"protocol", "datasets": {name: {"images", "skipped": {reason: n}, "skip_messages": [...], mode:
    {metric: mean, "images", "empty", ["frames", "points"]}}}, "average": {mode: {metric: mean over
    datasets, "datasets"}}, "predictor", "table"}.
  """
  modes = tuple(modes)
  if not modes or set(modes) - set(protocol.MODES):
    raise EvalConfigError(f"modes={modes!r}: expected a non-empty subset of {protocol.MODES}")
  if protocol_name not in protocol.PROTOCOLS:
    raise EvalConfigError(f"protocol={protocol_name!r}: expected one of {protocol.PROTOCOLS}")
  conv = protocol.conventions(protocol_name)
  if preprocessing is not None:
    if preprocessing not in PREPROCESSING:
      raise EvalConfigError(f"preprocessing={preprocessing!r}: expected one of {PREPROCESSING}")
    conv = dataclasses.replace(conv, preprocessing=preprocessing)
  if len({d.name for d in datasets}) != len(datasets):
    raise EvalConfigError("dataset names must be unique")
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  signature = {"predictor": predictor.description, "modes": list(modes), "protocol": protocol_name,
               "preprocessing": conv.preprocessing, "datasets": [_signature(d) for d in datasets],
               "limit": limit}
  run_file = out / RUN_FILE
  if run_file.exists() and json.loads(run_file.read_text()) != signature:
    raise EvalConfigError(f"{out} holds results of a different run ({run_file}); use another --out directory "
                          "(settings must match to resume)")
  run_file.write_text(json.dumps(signature, indent=2))
  items, bad_lines = plan(datasets, modes, protocol_name, limit)
  results_path = out / RESULTS_FILE
  done = _read_results(results_path)
  todo = [it for it in items if it.key not in done]
  bar = tqdm.tqdm(total=len(items), initial=len(items) - len(todo), desc="evaluate", disable=not progress,
                  dynamic_ncols=True)
  finished = 0
  f = _ResultsWriter(results_path)
  with contextlib.closing(f), concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for chunk in _batches(todo, predictor, batch_size, conv):
      loaded = list(pool.map(functools.partial(_load, conv=conv), chunk))
      ok = [it for it in loaded if isinstance(it, Item) and not it.empty]
      preds = predictor(ok, conv) if ok else []
      rows = {}
      for it, res in zip(chunk, loaded):
        row = {"key": it.key, "dataset": it.dataset.name, "image": it.record.image, "source": it.record.source}
        if isinstance(res, rgbd.SampleError):
          row.update(skipped=res.reason, detail=str(res))
        elif it.empty:
          row.update(empty=True, results=protocol.empty_results(it.record, modes, conv, it.frame))
        rows[it.key] = row
      for it, pred in zip(ok, preds):
        try:
          rows[it.key]["results"] = protocol.image_results(pred, it.sample, it.record, modes, conv, it.frame,
                                                           it.sparse_gt)
        except Exception as e:  # noqa: BLE001 -- reported as this record's skip, the run goes on
          rows[it.key].update(skipped="other", detail=_with_source(it.record, f"{type(e).__name__}: {e}"))
        it.sample = it.sparse_gt = None  # free the maps
      f.add("".join(json.dumps(r) + "\n" for r in rows.values()))
      finished += len(chunk)
      bar.update(len(chunk))
      if after_batch is not None:
        after_batch(finished)
  bar.close()
  keys = {it.key for it in items}
  rows = [r for r in _read_results(results_path).values() if r["key"] in keys]
  summary = summarize(rows, datasets, modes, protocol_name, bad_lines)
  summary["predictor"] = predictor.description
  summary["preprocessing"] = conv.preprocessing
  summary["bad_records"] = {k: len(v) for k, v in bad_lines.items() if v}
  summary["bad_lines"] = {k: v for k, v in bad_lines.items() if v}  # every rejected line, with its file:line
  summary["table"] = format_table(summary, modes)
  (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
  return summary
