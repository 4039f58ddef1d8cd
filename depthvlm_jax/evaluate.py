"""DepthVLM-Bench evaluation (SPEC §5): per-dataset and average δ1 and the standard depth metrics.

  python -m depthvlm_jax.evaluate --model DIR_OR_CKPT \\
      --data scannetpp=/data/scannetpp/test.jsonl|/data/scannetpp/rgb|/data/scannetpp/depth \\
      --data nyuv2=/data/nyu/test.jsonl|/data/nyu|/data/nyu \\
      --modes sparse,dense --protocol correct --out /tmp/eval_run

  --data NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]   KIND (depth range, crop; default NAME) is one of
                                                   `data_pipelines.rgbd.DATASET_DEPTH_RANGES`
  --baseline constant:2 | constant:train_median:JSONL|IMAGE_ROOT|DEPTH_ROOT|KIND | ground_truth
                                                   instead of --model
  --protocol official|correct                      official: the authors' evaluator end to end (the
                                                   paper's numbers); correct: our aligned conventions
                                                   (default). `evaluation/protocol.py`, README table.
  --coord_frame NAME=rgb|depth                     frame of pixel_coords (correct protocol)
  --preprocess official|direct                     override the protocol's image preprocessing
  --coords official|correct                        former name of --protocol (kept as an alias)

Outputs in --out: `per_image.jsonl` (one line per image, appended after every batch; a rerun with the
same settings skips what is there, so an interrupted run resumes), `results.json` (the summary
below) and the printed table. Per image, dense and sparse metrics are computed on the host from the
predictor's depth map; datasets average their images, "average" averages the datasets. Images without
a valid point are counted (`empty`): left out of the means (correct) or counted as δ1 = 0 (official).
No single record stops a run: a bad JSON line, a missing or broken file, a missing depth_scale
(correct), out-of-frame coordinates (correct) or any other fault of one record skips that record and
is counted per reason, with its file:line message (`skipped`, `skip_messages`, and the table).

Model predictions are batched and jitted: images are grouped by processed size (one compiled program
per size and padded prompt length, the last batch padded by repetition) and the batch is sharded over
the mesh's data axes (`--mesh data=-1`). Single-process; multi-host would need
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import pathlib
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tqdm

from data_pipelines import rgbd
from data_pipelines.pipeline import DEFAULT_PROMPT
from depthvlm_jax.evaluation import metrics, protocol
from depthvlm_jax.processing.image_processor import PREPROCESSING, ImageProcessorConfig, processed_size

RESULTS_FILE = "per_image.jsonl"
SUMMARY_FILE = "results.json"
RUN_FILE = "run.json"


class EvalConfigError(ValueError):
  """Bad evaluation settings (message names the setting and what was expected)."""


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """One annotation file with its roots; `kind` picks depth range and crop (SPEC §4)."""

  name: str
  jsonl: str
  image_root: str
  depth_root: str = ""
  kind: str = ""
  coord_frame: str | None = None  # frame of pixel_coords for "correct" mode (None: see protocol.py)

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
  return EvalDataset(name, jsonl, image_root, depth_root or image_root, kind,
                     (coord_frames or {}).get(name))


# ----------------------------------------------------------------------------- predictors
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


def _default_processed_hw(item: Item, conv: protocol.Conventions) -> tuple[int, int]:
  """The size a default Qwen3-VL processor feeds the model for this item's canonical image."""
  return processed_size(*planned_canonical_hw(item), ImageProcessorConfig(), conv.preprocessing)


class ConstantDepth:
  """Baseline: the same depth (metres) everywhere, at the size a model would predict."""

  def __init__(self, value: float, label: str | None = None):
    if not (value > 0 and math.isfinite(value)):
      raise EvalConfigError(f"constant depth must be a positive number of metres, got {value!r}")
    self.value = float(value)
    self.description = label or f"constant:{self.value:g}"

  def bucket(self, item: Item, conv: protocol.Conventions):
    return 0

  def __call__(self, items: Sequence[Item], conv: protocol.Conventions) -> list[np.ndarray]:
    return [np.full(_default_processed_hw(it, conv), self.value, np.float32) for it in items]


class GroundTruth:
  """Baseline: the canonical GT map itself as the prediction (checks the protocol; δ1 must be 1)."""

  description = "ground_truth"

  def bucket(self, item: Item, conv: protocol.Conventions):
    return 0

  def __call__(self, items: Sequence[Item], conv: protocol.Conventions) -> list[np.ndarray]:
    return [it.sample.depth.copy() for it in items]


def system_turn_ids(tokenizer, system_prompt: str | None) -> list[int]:
  """Token ids of a `<|im_start|>system ... <|im_end|>` turn (the chat template's system turn), or []."""
  if not system_prompt:
    return []
  return list(tokenizer(f"<|im_start|>system\n{system_prompt}<|im_end|>\n", add_special_tokens=False).input_ids)


class ModelPredictor:
  """DepthVLM depth maps at the processed resolution, batched, jitted and sharded over the mesh.

  Images are resized to the processed size of their canonical size (`processed_size`: multiples of
  32, directly or after the official 28-multiple step); each processed size is one static bucket
  (`depth_grid`), the token sequence is padded to a multiple of `seq_multiple`, and the batch to
  `batch_size` (a multiple of the mesh's data axes).
  """

  def __init__(self, loaded, batch_size: int = 8, mesh=None, seq_multiple: int = 64):
    import jax
    from depthvlm_jax import sharding
    self.loaded, self.mesh, self.seq_multiple = loaded, mesh, seq_multiple
    data_ways = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch_size = -(-batch_size // data_ways) * data_ways
    self.description = f"model:{loaded.path}"
    model = loaded.model
    self._sharding = sharding
    self._fwd = jax.jit(
        lambda params, batch, grid: model.apply({"params": params}, batch["input_ids"], batch["position_ids"],
                                                batch["attention_mask"], batch["pixel_values"],
                                                batch["image_grid_hw"], compute_logits=False,
                                                depth_grid=grid).depth,
        static_argnums=2)

  def processed_hw(self, canonical_hw: tuple[int, int], preprocessing: str = "direct") -> tuple[int, int]:
    return processed_size(canonical_hw[0], canonical_hw[1], self.loaded.processor, preprocessing)

  def bucket(self, item: Item, conv: protocol.Conventions):
    return self.processed_hw(planned_canonical_hw(item), conv.preprocessing)

  def depth_at_processed(self, images: Sequence[np.ndarray], prompts: Sequence[str], preprocessing: str = "direct",
                         system_prompt: str | None = None) -> np.ndarray:
    """(Hc, Wc, 3) uint8 canonical images of one processed size -> (n, Hp, Wp) depth there."""
    import jax
    from depthvlm_jax.model.inputs import make_model_inputs
    from depthvlm_jax.processing import chat
    from depthvlm_jax.processing.image_processor import preprocess_image
    model, proc, tok = self.loaded.model, self.loaded.processor, self.loaded.tokenizer
    hp, wp = self.processed_hw(images[0].shape[:2], preprocessing)
    merge_px = proc.factor
    n_tokens = (hp // merge_px) * (wp // merge_px)
    patches, grid = zip(*(preprocess_image(im, proc, size=(hp, wp), preprocessing=preprocessing) for im in images))
    system = system_turn_ids(tok, system_prompt)
    ids = [np.asarray(system + list(chat.encode_sample(tok, p, [n_tokens])["input_ids"]), np.int32) for p in prompts]
    seq_len = -(-max(len(i) for i in ids) // self.seq_multiple) * self.seq_multiple
    n = len(images)
    pad = self.batch_size - n
    ids, patches = list(ids) + [ids[-1]] * pad, list(patches) + [patches[-1]] * pad
    grids = [g[1:] for g in grid] + [grid[-1][1:]] * pad
    batch = make_model_inputs(ids, model.config, patches, grids, padding_side="right", seq_len=seq_len,
                              pad_id=tok.pad_token_id)
    batch.pop("rope_deltas")
    if self.mesh is not None:
      names = {"position_ids": (None, "batch"), "pixel_values": ("images",), "image_grid_hw": ("images",)}
      batch = {k: jax.device_put(v, self._sharding.activation_sharding(self.mesh, *names.get(k, ("batch",)),
                                                                        shape=v.shape))
               for k, v in batch.items()}
    depth = self._fwd(self.loaded.params, batch, (hp // merge_px, wp // merge_px))
    return np.asarray(depth, np.float32)[:n]

  def __call__(self, items: Sequence[Item], conv: protocol.Conventions) -> list[np.ndarray]:
    out: list[np.ndarray | None] = [None] * len(items)
    groups = collections.defaultdict(list)
    for i, it in enumerate(items):
      groups[self.processed_hw(it.sample.image.shape[:2], conv.preprocessing)].append(i)
    for idx in groups.values():
      for s in range(0, len(idx), self.batch_size):
        part = idx[s:s + self.batch_size]
        maps = self.depth_at_processed([items[i].sample.image for i in part],
                                       [items[i].record.prompt or DEFAULT_PROMPT for i in part],
                                       conv.preprocessing, conv.system_prompt)
        for i, m in zip(part, maps):
          out[i] = m
    return out


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


def train_median_depth(dataset: EvalDataset, bins_per_octave: int = 2048, limit: int | None = None) -> float:
  """Median of every valid canonical GT pixel of a (train) annotation file.

  Pixels are pooled in a log2 histogram (0.001-4096 m, `bins_per_octave` bins per doubling: relative
  resolution 0.03%), so memory stays constant; the result is the centre of the median bin.
  """
  records, _ = rgbd.read_jsonl(dataset.jsonl)
  lo, octaves = -10.0, 22
  edges = np.linspace(lo, lo + octaves, octaves * bins_per_octave + 1)
  hist = np.zeros(len(edges) - 1, np.int64)
  for r in records[:limit]:
    try:
      s = rgbd.load_sample(r, dataset.image_root, dataset.depth_root, dataset.dataset_kind)
    except rgbd.SampleError:
      continue
    hist += np.histogram(np.log2(s.depth[s.depth > 0]), edges)[0]
  if hist.sum() == 0:
    raise EvalConfigError(f"{dataset.jsonl}: no valid depth pixel to take a median of")
  i = int(np.searchsorted(np.cumsum(hist), (hist.sum() + 1) / 2))
  return float(2 ** ((edges[i] + edges[i + 1]) / 2))


def make_baseline(spec: str):
  """"ground_truth" | "constant:2" | "constant:train_median:JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]"."""
  if spec == "ground_truth":
    return GroundTruth()
  if spec.startswith("constant:train_median:"):
    ds = parse_dataset("train=" + spec[len("constant:train_median:"):])
    value = train_median_depth(ds)
    return ConstantDepth(value, f"constant:train_median={value:.4f}")
  if spec.startswith("constant:"):
    try:
      return ConstantDepth(float(spec[len("constant:"):]))
    except ValueError:
      pass
  raise EvalConfigError(f"--baseline {spec!r}: expected ground_truth, constant:METRES or "
                        "constant:train_median:JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]")


# ----------------------------------------------------------------------------- bookkeeping
def _read_results(path: pathlib.Path) -> dict[str, dict]:
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
  with open(path) as f:
    for n, line in enumerate(f, 1):
      try:
        obj = json.loads(line) if line.strip() else None
      except json.JSONDecodeError:
        obj = None
      if isinstance(obj, dict) and obj.get(protocol.FRAME_FIELD) is not None:
        out[n] = obj[protocol.FRAME_FIELD]
  return out


SKIP_EXAMPLES = 5  # file:line messages kept per dataset in the summary


def _line_of(source: str) -> int:
  return int(source.rsplit(":", 1)[1])


def plan(datasets: Sequence[EvalDataset], modes: Sequence[str], protocol_name: str,
         limit: int | None = None) -> tuple[list[Item], dict[str, list[str]]]:
  """All items of all datasets and each dataset's rejected JSON lines (messages with file:line).

  Coordinate frames are chosen now; a record whose frame cannot be decided (correct protocol) gets a
  `skip` and is reported like any other skipped record. Only settings errors raise.
  """
  conv = protocol.conventions(protocol_name)
  items, bad = [], {}
  for ds in datasets:
    if not pathlib.Path(ds.jsonl).exists():
      raise EvalConfigError(f"dataset {ds.name!r}: annotation file {ds.jsonl} not found")
    records, errors = rgbd.read_jsonl(ds.jsonl)
    bad[ds.name] = [str(e) for e in errors]
    frames = _raw_frames(ds.jsonl)
    for r in records[:limit]:
      line = _line_of(r.source)
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


# ----------------------------------------------------------------------------- summary
def summarize(rows: Sequence[dict], datasets: Sequence[EvalDataset], modes: Sequence[str], protocol_name: str,
              bad_lines: dict[str, list[str]] | None = None) -> dict[str, Any]:
  """Per-dataset means of every metric per mode, the frames used, skips, and the dataset average.

  Correct protocol: images without a valid point (`empty`) are left out of every mean. Official: they
  count δ1 = 0 (the authors' average); the other metrics, which the authors do not report, average the
  non-empty images.
  """
  conv = protocol.conventions(protocol_name)
  out: dict[str, Any] = {"protocol": protocol_name, "datasets": {}, "average": {}}
  bad_lines = bad_lines or {}
  for ds in datasets:
    mine = sorted((r for r in rows if r["dataset"] == ds.name), key=lambda r: _line_of(r["source"]))
    skipped = [r for r in mine if "skipped" in r]
    messages = sorted([(_line_of(r["source"]), r["detail"]) for r in skipped] +
                      [(_line_of(m.split(": ", 1)[0]), m) for m in bad_lines.get(ds.name, [])])
    counts = collections.Counter(r["skipped"] for r in skipped)
    if bad_lines.get(ds.name):
      counts["bad_line"] = len(bad_lines[ds.name])
    entry: dict[str, Any] = {"images": len(mine) - len(skipped), "skipped": dict(counts),
                             "skip_messages": [m for _, m in messages[:SKIP_EXAMPLES]]}
    for mode in modes:
      res = [r["results"][mode] for r in mine if mode in r.get("results", {})]
      used = [x for x in res if x["count"] > 0]
      m = {"images": len(res) if conv.empty_counts_zero else len(used), "empty": len(res) - len(used)}
      m.update({k: float(np.mean([x[k] for x in used])) if used else None for k in metrics.METRIC_NAMES})
      if conv.empty_counts_zero and res:
        m["delta1"] = float(np.sum([x["delta1"] for x in used]) / len(res))
      if mode == "sparse":
        m["frames"] = dict(collections.Counter(x["frame"] for x in res))
        m["points"] = int(sum(x["count"] for x in used))
      entry[mode] = m
    out["datasets"][ds.name] = entry
  for mode in modes:
    have = [e[mode] for e in out["datasets"].values() if e[mode]["images"]]
    out["average"][mode] = ({k: float(np.mean([e[k] for e in have if e[k] is not None]))
                             if any(e[k] is not None for e in have) else None for k in metrics.METRIC_NAMES}
                            if have else None)
    if have:
      out["average"][mode]["datasets"] = len(have)
  return out


_COLUMNS = (("delta1", "δ1"), ("delta2", "δ2"), ("delta3", "δ3"), ("abs_rel", "AbsRel"), ("sq_rel", "SqRel"),
            ("rmse", "RMSE"), ("rmse_log", "RMSElog"), ("silog", "SILog"))


_CELLS = {"delta1": (10, 6)}  # (width, decimals); δ1, the headline, to the 6 decimals the authors print


def _cell(key: str, value: float | None) -> str:
  width, decimals = _CELLS.get(key, (9, 4))
  return f"{value:>{width}.{decimals}f}" if value is not None else f"{'-':>{width}}"


def format_skips(summary: dict[str, Any]) -> str:
  """"skipped records" block: per dataset, count per reason and the first file:line messages."""
  lines = []
  for name, e in summary["datasets"].items():
    if not e["skipped"]:
      continue
    total = sum(e["skipped"].values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(e["skipped"].items()))
    lines.append(f"  {name}: {total} skipped ({reasons})")
    lines += [f"    {m}" for m in e["skip_messages"]]
    if total > len(e["skip_messages"]):
      lines.append(f"    ... {total - len(e['skip_messages'])} more ({RESULTS_FILE} has a line for each skipped record)")
  return "\n".join(["skipped records:"] + lines) if lines else "skipped records: none"


def format_table(summary: dict[str, Any], modes: Sequence[str]) -> str:
  """A fixed-width text table: one row per dataset and mode, the averages, then the skip summary."""
  head = f"{'dataset':<14}{'mode':<7}{'frame':<16}{'images':>7}" + "".join(
      f"{t:>{_CELLS.get(k, (9, 4))[0]}}" for k, t in _COLUMNS)
  lines = [f"protocol: {summary['protocol']}", head, "-" * len(head)]

  def row(name, mode, frame, n, m):
    vals = "".join(_cell(k, m.get(k) if m else None) for k, _ in _COLUMNS)
    return f"{name:<14}{mode:<7}{frame:<16}{n:>7}" + vals

  for name, e in summary["datasets"].items():
    for mode in modes:
      m = e[mode]
      frame = ",".join(f"{k}:{v}" for k, v in m.get("frames", {}).items()) if mode == "sparse" else "-"
      lines.append(row(name, mode, frame or "-", m["images"], m))
  lines.append("-" * len(head))
  for mode in modes:
    a = summary["average"][mode]
    lines.append(row("average", mode, summary["protocol"] if mode == "sparse" else "-",
                     a["datasets"] if a else 0, a))
  return "\n".join(lines + [format_skips(summary)])


# ----------------------------------------------------------------------------- run
def run(predictor, datasets: Sequence[EvalDataset], out_dir: str | pathlib.Path,
        modes: Sequence[str] = protocol.MODES, protocol_name: str = "correct", batch_size: int = 8,
        limit: int | None = None, workers: int = 4, progress: bool = True,
        after_batch: Callable[[int], None] | None = None, preprocessing: str | None = None) -> dict[str, Any]:
  """Evaluates `predictor` on `datasets`, resuming from `out_dir`; returns the summary dict.

  Args:
    predictor: `ModelPredictor(load_model(path))`, `ConstantDepth(2.0)` or `GroundTruth()`.
    datasets: the annotation files.
    out_dir: where per_image.jsonl / results.json / run.json live (created).
    modes: subset of ("sparse", "dense").
    protocol_name: "official" | "correct" (`evaluation.protocol.CONVENTIONS`).
    batch_size: images per predictor call (a model rounds it up to the mesh's data-parallel size).
    limit: evaluate only the first `limit` records of each file.
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
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  signature = {"predictor": predictor.description, "modes": list(modes), "protocol": protocol_name,
               "preprocessing": conv.preprocessing, "datasets": [dataclasses.asdict(d) for d in datasets],
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
  with results_path.open("a") as f, concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
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
      f.write("".join(json.dumps(r) + "\n" for r in rows.values()))
      f.flush()
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
  summary["table"] = format_table(summary, modes)
  (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
  return summary


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  import argparse
  ap = argparse.ArgumentParser(prog="python -m depthvlm_jax.evaluate", description=__doc__.split("\n")[0])
  ap.add_argument("--model", help="HF-layout DepthVLM/Qwen3-VL directory or a training workdir")
  ap.add_argument("--baseline", help="ground_truth | constant:METRES | constant:train_median:JSONL|IMG|DEPTH|KIND")
  ap.add_argument("--data", action="append", required=True, help="NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]")
  ap.add_argument("--out", required=True, help="output directory (reused to resume)")
  ap.add_argument("--modes", default="sparse,dense", help="comma list of sparse,dense")
  ap.add_argument("--protocol", default=None, choices=protocol.PROTOCOLS,
                  help="official: the authors' evaluator (paper numbers); correct: aligned conventions (default)")
  ap.add_argument("--coords", default=None, choices=protocol.PROTOCOLS, help="former name of --protocol")
  ap.add_argument("--preprocess", default=None, choices=PREPROCESSING,
                  help="image preprocessing (default: the protocol's; official = 28-then-32 resize)")
  ap.add_argument("--coord_frame", action="append", default=[], help="NAME=rgb|depth (correct protocol)")
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--limit", type=int, default=None, help="first N records of each file")
  ap.add_argument("--workers", type=int, default=4)
  ap.add_argument("--mesh", default="data=-1", help="mesh axes, e.g. data=-1 or data=2,fsdp=4")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--verbosity", type=int, default=0, help="1: print the traceback of an error too")
  args = ap.parse_args(argv)
  if bool(args.model) == bool(args.baseline):
    ap.error("give exactly one of --model or --baseline")
  if args.protocol and args.coords and args.protocol != args.coords:
    ap.error(f"--coords {args.coords} contradicts --protocol {args.protocol} (--coords is its former name)")
  protocol_name = args.protocol or args.coords or "correct"
  frames = {}
  for v in args.coord_frame:
    name, _, frame = v.partition("=")
    if frame not in protocol.FRAMES:
      ap.error(f"--coord_frame {v!r}: expected NAME=rgb|depth")
    frames[name] = frame
  datasets = [parse_dataset(v, frames) for v in args.data]
  unknown = set(frames) - {d.name for d in datasets}
  if unknown:
    ap.error(f"--coord_frame names {sorted(unknown)} are not --data names")
  if args.model:
    import jax.numpy as jnp
    from depthvlm_jax import sharding
    from depthvlm_jax.evaluation.loading import load_model
    mesh = sharding.make_mesh({k: int(v) for k, v in (p.split("=") for p in args.mesh.split(","))})
    loaded = load_model(args.model, dtype=getattr(jnp, args.dtype), mesh=mesh)
    predictor = ModelPredictor(loaded, args.batch_size, mesh)
  else:
    predictor = make_baseline(args.baseline)
  summary = run(predictor, datasets, args.out, tuple(m.strip() for m in args.modes.split(",") if m.strip()),
                protocol_name, args.batch_size, args.limit, args.workers, preprocessing=args.preprocess)
  print(summary["table"])
  print(f"wrote {pathlib.Path(args.out) / SUMMARY_FILE}")
  return summary


if __name__ == "__main__":
  from depthvlm_jax import cli
  with cli.user_errors(cli.verbosity_from_argv(sys.argv[1:]), extra=(EvalConfigError,)):
    main()
