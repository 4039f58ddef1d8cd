"""The size index: each record's canonical (h, w), known before any image is opened.

Bucketing needs the size every record will have after `pipeline.load_canonical`. It comes from the
annotation alone (`canonical_size`, or the intrinsics `original_fx` with `original_rgb_size`) or, for
a converted ArrayRecord split, from its `canonical_hw` feature, read without decoding the image.
Building the index therefore costs time proportional to the annotation, not to the images.

A record whose size the annotation does not give (no `original_rgb_size` next to `original_fx`, a
caption/QA record without intrinsics, a split converted before `canonical_hw` existed) is marked
unknown (-1, -1) and sized lazily: its image header (or converted example) is read the first time a
bucket's stream draws it (`pipeline.InBucket`).

`size_index(..., cache_dir=...)` keeps the index in `cache_dir`, keyed by the source's settings and
the size and modification time of its files (and the data shard: each process sizes and keeps only
its own records), so a restarted or resumed run reads it back. The training pipeline sizes a
JSON Lines file from the fields its one pass over the file parses (`sizes_from_fields`), and only
its own shard of the records (`pipeline.make_dataset`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Callable, Sequence

import numpy as np
from etils import epath
from PIL import Image

from data_pipelines import rgbd
from data_pipelines.skips import Skipped

UNKNOWN = -1  # (h, w) = (-1, -1): sized lazily when read
NEVER = 0  # (0, 0): no size can be known (the record is skipped when prepared)
BAD = -2  # (-2, -2): a line that is not a valid record (skipped as bad_record when drawn)


def _crop(hw: tuple[int, int], dataset: str) -> tuple[int, int]:
  h, w = hw
  if dataset in rgbd.CENTRE_CROP_1024:
    return min(h, 1024), min(w, 1024)
  return h, w


def canonical_hw(record: Any, source) -> tuple[int, int] | None:
  """(h, w) of a record's image as `pipeline.load_canonical` will return it, from the annotation
  only; None when the annotation does not give it (see `header_hw`). A converted (array_record)
  example dict gives its image's shape."""
  if isinstance(record, Skipped):
    return None
  if isinstance(record, dict):
    return tuple(record["image"].shape[:2])
  if record.canonical_size is not None:
    w, h = record.canonical_size
  elif record.original_fx is not None and record.original_rgb_size is not None:
    w, h = rgbd.canonical_size(record.original_rgb_size, record.original_fx, record.canonical_fx)
  else:
    return None
  return _crop((h, w), source.dataset)


def _header_size(path) -> tuple[int, int]:
  """(h, w) of an image as `rgbd.load_rgb` returns it (EXIF rotation applied), from its header."""
  with epath.Path(path).open("rb") as f, Image.open(f) as im:
    w, h = im.size
    if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that swap the axes
      w, h = h, w
  return h, w


def header_hw(record: Any, source) -> tuple[int, int] | None:
  """(h, w) as `canonical_hw`, reading the image header (or the converted example) when the
  annotation does not give it; None when it cannot be known (the sample is skipped when prepared)."""
  hw = canonical_hw(record, source)
  if hw is not None or isinstance(record, (Skipped, dict)):
    return hw
  try:
    if record.original_fx is not None:
      h0, w0 = _header_size(rgbd.resolve_path(source.image_root, record.image))
      w, h = rgbd.canonical_size((w0, h0), record.original_fx, record.canonical_fx)
    elif record.canonical_size is None and not source.with_depth:
      h, w = _header_size(rgbd.resolve_path(source.image_root, record.image))
    else:
      return None
  except Exception:  # unreadable header, bad path: the sample is skipped when prepared
    return None
  return _crop((h, w), source.dataset)


def _cache_key(source) -> str | None:
  """A key naming the source's settings and the size and mtime of its files (None: not a file)."""
  remote = "://" in str(source.jsonl)
  path = epath.Path(source.jsonl) if remote else pathlib.Path(source.jsonl)
  files = sorted(path.glob(f"*-{source.split}.array_record*")) + [path / "dataset_info.json"] \
      if source.format == "array_record" else [path]
  try:
    if remote:  # an object store: its size and modification time as its client reports them
      stats = [(str(f), f.stat().length, str(f.stat().mtime)) for f in files]
    else:
      stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
  except (OSError, AttributeError):
    return None
  settings = [source.format, source.split, source.dataset, source.with_depth, stats]
  return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:24]


def compute_sizes(source, records: Sequence[Any]) -> np.ndarray:
  """(N, 2) int32 canonical (h, w) of every record from the annotation: (-1, -1) where the image
  header will tell (`header_hw`), (0, 0) where nothing can (the sample is skipped when prepared)."""
  sizes = getattr(records, "canonical_sizes", None)
  if sizes is not None:  # converted split: the builder's feature, read without the images
    return sizes()
  out = np.full((len(records), 2), NEVER, np.int32)
  for i, r in enumerate(records):
    hw = canonical_hw(r, source)
    if hw is not None:
      out[i] = hw
    elif _sized_by_header(r, source):
      out[i] = UNKNOWN
  return out


def sizes_from_fields(source, fields: np.ndarray) -> np.ndarray:
  """`compute_sizes` of records given by their `rgbd.size_fields` (N, 6) (as `rgbd.scan_jsonl`
  returns them), without the records: the same float64 arithmetic as `canonical_hw` (rounded half
  to even, as Python's `round`); (BAD, BAD) for a line that is not a valid record."""
  cw, ch, ow, oh, ofx, cfx = np.asarray(fields, np.float64).reshape(-1, 6).T
  out = np.full((len(cw), 2), NEVER, np.int32)
  bad = np.isnan(cfx)
  given = ~np.isnan(cw)
  from_fx = ~given & ~np.isnan(ofx) & ~np.isnan(ow)
  w, h = np.where(given, cw, 0.0), np.where(given, ch, 0.0)
  scale = cfx[from_fx] / ofx[from_fx]
  w[from_fx], h[from_fx] = np.round(ow[from_fx] * scale), np.round(oh[from_fx] * scale)
  known = (given | from_fx) & ~bad
  if source.dataset in rgbd.CENTRE_CROP_1024:
    h, w = np.minimum(h, 1024), np.minimum(w, 1024)
  out[known] = np.stack([h[known], w[known]], axis=1).astype(np.int32)
  by_header = ~known & ~bad & (~np.isnan(ofx) | (~given & (not source.with_depth)))
  out[by_header] = UNKNOWN
  out[bad] = BAD
  return out


def _sized_by_header(record: Any, source) -> bool:
  return isinstance(record, rgbd.RGBDRecord) and (
      record.original_fx is not None or (record.canonical_size is None and not source.with_depth))


def size_index(source, records: Sequence[Any], cache_dir: str | os.PathLike | None = None) -> np.ndarray:
  """`compute_sizes`, read from / written to `cache_dir` when given (see the module docstring)."""
  return cached(source, cache_dir, len(records), lambda: compute_sizes(source, records))


def cached(source, cache_dir: str | os.PathLike | None, n: int, compute: Callable[[], np.ndarray],
           shard: tuple[int, int] = (0, 1)) -> np.ndarray:
  """The (n, 2) sizes of data shard `shard` of a source: read from `cache_dir`, else `compute()`d
  and written there (None: not kept). Each shard has its own file, so a process keeps and reads back
  the sizes of its own records only."""
  key = _cache_key(source) if cache_dir is not None else None
  if key is None:
    return compute()
  if shard[1] > 1:
    key = f"{key}-shard{shard[0]}of{shard[1]}"
  cache = epath.Path(cache_dir) / f"sizes-{key}.npy"  # next to the run: local or on an object store
  if cache.exists():
    with cache.open("rb") as f:
      sizes = np.load(f)
    if sizes.shape == (n, 2):
      return sizes
    logging.warning("%s: %s holds %d sizes for %d records; recomputing", source.label, cache, len(sizes), n)
  sizes = compute()
  cache.parent.mkdir(parents=True, exist_ok=True)
  tmp = cache.parent / f"sizes-{key}.{os.getpid()}.tmp.npy"
  with tmp.open("wb") as f:
    np.save(f, sizes)
  tmp.replace(cache)
  return sizes
