"""DepthVLM annotation records (JSON Lines) and RGB-D readers with focal-length unification.

Focal unification: every image is resized so that its focal length becomes `canonical_fx` (RGB bilinear,
depth nearest) to `canonical_size` = original size * canonical_fx / original_fx (rounded);
Taskonomy and HM3D are centre-cropped to a 1024-pixel edge (cropping keeps fx); depth outside
the dataset's range becomes 0 (invalid); a sample without a valid depth pixel is skipped.

Two nearest-neighbour rules for the depth (and mask) resize, `NEAREST_RULES`:
  "centre": output pixel i reads input floor((i + 0.5) * in / out), the pixel whose centre is nearest
            (our default);
  "opencv": output pixel i reads input floor(i * in / out), OpenCV's INTER_NEAREST, used by the
            official loader: it samples each output pixel at its top-left corner instead of its
            centre, so the map moves half an output pixel towards the bottom right and pixels near
            depth edges read the neighbouring source pixel.
A record without `depth_scale` gets `load_sample(default_depth_scale=...)`: 1000 (the official
loader's default) unless the caller asks to refuse such records (None).

Errors: `RecordError` (a bad JSON line: file, line, field, what was expected) and `SampleError`
(an unusable sample, with a `reason` from `data_pipelines.skips.SKIP_REASONS`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import operator
import os
import pathlib
import posixpath
import threading
from typing import Any

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from depthvlm_jax.processing.image_processor import to_rgb

DATASET_DEPTH_RANGES = {
    "argoverse": (0.05, 120.0), "waymo": (0.05, 70.0), "nuscenes": (0.05, 80.0), "ddad": (0.05, 120.0),
    "scannetpp": (0.001, 10.0), "taskonomy": (0.005, 15.0), "hm3d": (0.01, 10.0), "matterport": (0.01, 10.0),
    "sunrgbd": (0.005, 8.0), "ibims": (0.005, 25.0), "nyuv2": (0.005, 10.0), "eth3d": (0.01, 50.0),
    "synthetic": (0.05, 80.0),
}
CENTRE_CROP_1024 = frozenset({"taskonomy", "hm3d"})
NEAREST_RULES = ("centre", "opencv")
OFFICIAL_DEPTH_SCALE = 1000.0  # the official loader's value for a record without depth_scale


class RecordError(ValueError):
  """A JSON line that is not a valid annotation record."""


class SampleError(ValueError):
  """A sample that cannot be used; `reason` names the skip counter it increments."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class RGBDRecord:
  image: str
  depth_path: str | None = None
  depth_scale: float | None = None  # None: absent from the record (see load_sample)
  depth_format: str = "png"
  mask_valid_path: str | None = None
  mask_transp_path: str | None = None
  original_rgb_size: tuple[int, int] | None = None  # (W, H)
  original_depth_size: tuple[int, int] | None = None
  original_fx: float | None = None
  original_fy: float | None = None
  original_cx: float | None = None
  original_cy: float | None = None
  canonical_fx: float = 1000.0
  canonical_size: tuple[int, int] | None = None  # (W, H)
  prompt: str | None = None
  solution: str | None = None
  pixel_coords: tuple[tuple[float, float], ...] | None = None
  depth: tuple[float, ...] | None = None
  depth_type: str | None = None
  source: str = ""  # "file:line", for messages


_STR = ("image", "depth_path", "mask_valid_path", "mask_transp_path", "prompt", "solution", "depth_type")
_NUM = ("depth_scale", "original_fx", "original_fy", "original_cx", "original_cy", "canonical_fx")
_SIZE = ("original_rgb_size", "original_depth_size", "canonical_size")


def parse_record(obj: Any, where: str) -> RGBDRecord:
  """Validates one decoded JSON object; `where` is "file:line" for messages."""
  if not isinstance(obj, dict):
    raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  kw: dict[str, Any] = {"source": where}
  for k in _STR:
    if obj.get(k) is not None:
      if not isinstance(obj[k], str):
        raise RecordError(f"{where}: field {k!r} must be a string, got {obj[k]!r}")
      kw[k] = obj[k]
  for k in _NUM:
    if obj.get(k) is not None:
      v = obj[k]
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise RecordError(f"{where}: field {k!r} must be a positive number, got {v!r}")
      kw[k] = float(v)
  for k in _SIZE:
    if obj.get(k) is not None:
      v = obj[k]
      if (not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                          for x in v)):
        raise RecordError(f"{where}: field {k!r} must be [W, H] positive integers, got {v!r}")
      kw[k] = (v[0], v[1])
  if "image" not in kw:
    raise RecordError(f"{where}: missing required field 'image'")
  fmt = obj.get("depth_format", "png")
  if fmt not in ("png", "binary_float32"):
    raise RecordError(f"{where}: field 'depth_format' must be 'png' or 'binary_float32', got {fmt!r}")
  kw["depth_format"] = fmt
  if obj.get("pixel_coords") is not None:
    pc = obj["pixel_coords"]
    if not isinstance(pc, list) or not all(isinstance(p, list) and len(p) == 2 and
                                           all(isinstance(x, (int, float)) for x in p) for p in pc):
      raise RecordError(f"{where}: field 'pixel_coords' must be a list of [x, y], got {str(pc)[:80]}")
    kw["pixel_coords"] = tuple((float(x), float(y)) for x, y in pc)
  if obj.get("depth") is not None:
    d = obj["depth"]
    if not isinstance(d, list) or not all(isinstance(x, (int, float)) for x in d):
      raise RecordError(f"{where}: field 'depth' must be a list of numbers")
    if kw.get("pixel_coords") is not None and len(d) != len(kw["pixel_coords"]):
      raise RecordError(f"{where}: 'depth' has {len(d)} values for {len(kw['pixel_coords'])} pixel_coords")
    kw["depth"] = tuple(float(x) for x in d)
  return RGBDRecord(**kw)


def read_jsonl(path: str | pathlib.Path) -> tuple[list[RGBDRecord], list[RecordError]]:
  """All valid records of a JSON Lines file (local or gs://), and an error per bad line (never raises for a line)."""
  path = epath.Path(path)
  records, errors = [], []
  with path.open() as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(parse_record(json.loads(line), f"{path}:{n}"))
      except json.JSONDecodeError as e:
        errors.append(RecordError(f"{path}:{n}: invalid JSON ({e.msg})"))
      except RecordError as e:
        errors.append(e)
  return records, errors


SIZE_FIELDS = ("canonical_w", "canonical_h", "original_w", "original_h", "original_fx", "canonical_fx")


def size_fields(record: RGBDRecord) -> np.ndarray:
  """(6,) float64: the fields a record's canonical size comes from (`SIZE_FIELDS`; NaN: absent)."""
  out = np.full(6, np.nan)
  if record.canonical_size is not None:
    out[0:2] = record.canonical_size
  if record.original_rgb_size is not None:
    out[2:4] = record.original_rgb_size
  if record.original_fx is not None:
    out[4] = record.original_fx
  out[5] = record.canonical_fx
  return out


class AnnotationFile(collections.abc.Sequence):
  """The records of a JSON Lines file by number (its non-empty lines, in order), each read from the
  file and parsed when indexed; indexing a bad line raises its `RecordError`.

  The process holds three integers per record (where its line starts, its length, its line
  number), not the records: a million parsed `RGBDRecord`s take gigabytes of Python objects, which
  every loader worker process would hold a copy of. Local files are read with `os.pread` (safe from
  the loader's threads); object-store files with one ranged read per record.
  """

  def __init__(self, path: str, starts: np.ndarray, lengths: np.ndarray, lines: np.ndarray):
    self.path, self.starts, self.lengths, self.lines = str(path), starts, lengths, lines
    self._fd: tuple[int, int] | None = None  # (process id, file descriptor), opened on first read
    self._lock = threading.Lock()

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state, _fd=None, _lock=threading.Lock())

  def __del__(self):
    if self._fd is not None and self._fd[0] == os.getpid():
      os.close(self._fd[1])

  def __len__(self) -> int:
    return len(self.starts)

  def _read(self, start: int, length: int) -> bytes:
    if not is_local(self.path):
      with epath.Path(self.path).open("rb") as f:
        f.seek(start)
        return f.read(length)
    with self._lock:
      if self._fd is None or self._fd[0] != os.getpid():  # not a descriptor inherited by a fork
        self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
      fd = self._fd[1]
    return os.pread(fd, length, start)

  def __getitem__(self, i) -> RGBDRecord:
    i = operator.index(i)
    i = i + len(self) if i < 0 else i
    if not 0 <= i < len(self):
      raise IndexError(f"{self.path}: record {i} of {len(self)}")
    return parse_line(self._read(int(self.starts[i]), int(self.lengths[i])), f"{self.path}:{self.lines[i]}")


def parse_line(line: bytes | str, where: str) -> RGBDRecord:
  """One annotation line -> `RGBDRecord`; raises `RecordError` (invalid JSON or UTF-8, a bad field)."""
  try:
    return parse_record(json.loads(line), where)
  except json.JSONDecodeError as e:
    raise RecordError(f"{where}: invalid JSON ({e.msg})") from None
  except UnicodeDecodeError as e:
    raise RecordError(f"{where}: not UTF-8 text ({e.reason})") from None


def scan_jsonl(path: str | pathlib.Path, shard: tuple[int, int] = (0, 1),
               parse: bool = True) -> tuple[AnnotationFile, np.ndarray | None]:
  """Reads a JSON Lines file once: every record's place in it, and (`parse`) the size fields of
  the records of one shard only.

  shard: (index, count): the records numbered i (non-empty lines from 0) with i % count == index.
  Returns (the whole file's `AnnotationFile`, (n, 6) float64 `size_fields` of the shard's records
  in order, all NaN and column 5 NaN too for a bad line; None without `parse`).
  """
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"{path}: data shard {index} of {count}; expected 0 <= index < count")
  path = epath.Path(path)
  starts, lengths, lines, fields = [], [], [], []
  offset, number = 0, 0
  with path.open("rb") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        body = line.rstrip(b"\r\n")
        if parse and number % count == index:
          try:
            fields.append(size_fields(parse_line(body, f"{path}:{n}")))
          except RecordError:
            fields.append(np.full(6, np.nan))
        starts.append(offset)
        lengths.append(len(body))
        lines.append(n)
        number += 1
      offset += len(line)
  table = AnnotationFile(str(path), np.asarray(starts, np.int64), np.asarray(lengths, np.int64),
                         np.asarray(lines, np.int64))
  return table, (np.asarray(fields, np.float64).reshape(-1, 6) if parse else None)


def is_local(path: str | pathlib.Path) -> bool:
  """False for an object-store path (`gs://...` and other URI schemes that `etils.epath` reads)."""
  return "://" not in str(path)


def resolve_path(root: str | pathlib.Path, rel: str) -> epath.Path:
  """`root / rel`, refusing absolute paths and paths that escape `root`.

  Local roots resolve symbolic links; object-store roots (no links there) are normalised by name.
  """
  if pathlib.PurePath(rel).is_absolute():
    shown = pathlib.Path(root).resolve() if is_local(root) else epath.Path(root)
    raise SampleError("bad_record", f"path {rel!r} is absolute; annotation paths must be relative to {shown}")
  if is_local(root):  # pathlib: epath's resolve does not follow symbolic links
    root_l = pathlib.Path(root).resolve()
    resolved = (root_l / rel).resolve()
    root_p, p = epath.Path(root_l), epath.Path(resolved)
    inside = root_l in resolved.parents or resolved == root_l
  else:
    root_p = epath.Path(root)
    norm = posixpath.normpath(rel)
    p = root_p / norm
    inside = norm != ".." and not norm.startswith("../")
  if not inside:
    raise SampleError("bad_record", f"path {rel!r} escapes the data root {root_p}")
  return p


def _describe(e: BaseException) -> str:
  if isinstance(e, Image.DecompressionBombError):
    return f"{e} (PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})"
  return str(e) if isinstance(e, (UnidentifiedImageError, OSError)) else f"{type(e).__name__}: {e}"


def load_rgb(path: str | pathlib.Path, exif_transpose: bool = True) -> np.ndarray:
  """(H, W, 3) uint8 RGB; EXIF rotation applied (unless `exif_transpose=False`); grey/RGBA/16-bit converted."""
  path = epath.Path(path)
  try:
    with path.open("rb") as f, Image.open(f) as im:
      im.load()
      return np.asarray(to_rgb(im, exif_transpose))
  except FileNotFoundError:
    raise SampleError("unreadable_image", f"{path}: image file not found") from None
  except Exception as e:  # PIL's decoders raise OSError, ValueError, SyntaxError, DecompressionBombError, ...
    raise SampleError("unreadable_image", f"{path}: cannot decode image ({_describe(e)})") from None


def load_depth(path: str | pathlib.Path, scale: float, fmt: str = "png",
               size_wh: tuple[int, int] | None = None) -> np.ndarray:
  """(H, W) float32 metres; non-finite or negative values become 0 (invalid)."""
  path = epath.Path(path)
  if not path.exists():
    raise SampleError("missing_depth", f"{path}: depth file not found")
  try:
    if fmt == "binary_float32":
      if size_wh is None:
        raise SampleError("bad_record", f"{path}: binary_float32 depth needs original_depth_size or original_rgb_size")
      data = path.read_bytes()
      raw = np.frombuffer(data, np.float32, count=len(data) // 4)  # a trailing partial value is dropped
      w, h = size_wh
      if raw.size != w * h:
        raise SampleError("corrupt_depth", f"{path}: {raw.size} float32 values, expected {w}x{h}={w * h}")
      depth = raw.reshape(h, w)
    else:
      with path.open("rb") as f, Image.open(f) as im:
        im.load()
        depth = np.asarray(im)
      if depth.ndim != 2:
        raise SampleError("corrupt_depth", f"{path}: depth PNG has shape {depth.shape}, expected one channel")
    depth = depth.astype(np.float32) / np.float32(scale)
  except SampleError:
    raise
  except Exception as e:  # any decoder failure, as in load_rgb
    raise SampleError("corrupt_depth", f"{path}: cannot decode depth ({_describe(e)})") from None
  return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


def load_mask(path: str | pathlib.Path) -> np.ndarray:
  path = epath.Path(path)
  try:
    with path.open("rb") as f, Image.open(f) as im:
      im.load()
      m = np.asarray(im)
  except Exception as e:  # any decoder failure, as in load_rgb
    raise SampleError("corrupt_depth", f"{path}: cannot read mask ({_describe(e)})") from None
  return m if m.ndim == 2 else m[..., 0]


def canonical_size(original_wh: tuple[int, int], original_fx: float, canonical_fx: float) -> tuple[int, int]:
  s = canonical_fx / original_fx
  return int(round(original_wh[0] * s)), int(round(original_wh[1] * s))


@dataclasses.dataclass
class CanonicalSample:
  image: np.ndarray  # (Hc, Wc, 3) uint8
  depth: np.ndarray | None  # (Hc, Wc) float32 metres, 0 = invalid; None: image-only (caption/QA)
  crop_offset: tuple[int, int]  # (x0, y0) of the centre crop in the resized image
  size_before_crop: tuple[int, int]  # (W, H) canonical size


def nearest_indices(n_in: int, n_out: int, rule: str = "centre") -> np.ndarray:
  """(n_out,) int64 source index of each output pixel under a nearest rule (`NEAREST_RULES`)."""
  if rule == "centre":
    idx = np.floor((np.arange(n_out) + 0.5) * n_in / n_out)
  elif rule == "opencv":
    # OpenCV stores the scale as out/in and multiplies by its reciprocal (float64), then floors.
    idx = np.floor(np.arange(n_out) * (1.0 / (n_out / n_in)))
  else:
    raise ValueError(f"nearest rule {rule!r}; expected one of {NEAREST_RULES}")
  return np.minimum(idx.astype(np.int64), n_in - 1)


def resize_nearest(depth: np.ndarray, size_wh: tuple[int, int], rule: str = "centre") -> np.ndarray:
  """(H, W[, C]) -> (size_wh[1], size_wh[0][, C]) nearest-neighbour resize under `rule` (module docstring)."""
  h, w = depth.shape[:2]
  return depth[nearest_indices(h, size_wh[1], rule)][:, nearest_indices(w, size_wh[0], rule)]


def unify_focal(rgb: np.ndarray, depth: np.ndarray | None, record: RGBDRecord, dataset: str,
                nearest_rule: str = "centre") -> CanonicalSample:
  """Resizes RGB (bilinear) and depth (nearest, `nearest_rule`) to the canonical focal length, crops,
  range-masks.

  rgb (H, W, 3) uint8, depth (Hd, Wd) float32 metres or None (image-only record: RGB only, no
  range check) -> CanonicalSample at `canonical_size` (after any centre crop).
  """
  h, w = rgb.shape[:2]
  if record.canonical_size is not None:
    size = record.canonical_size
  elif record.original_fx is not None:
    size = canonical_size(record.original_rgb_size or (w, h), record.original_fx, record.canonical_fx)
  else:
    raise SampleError("bad_record", f"{record.source}: needs canonical_size or original_fx")
  if record.original_rgb_size is not None and record.original_rgb_size != (w, h):
    raise SampleError("bad_record", f"{record.source}: image is {w}x{h}, record says original_rgb_size "
                      f"{list(record.original_rgb_size)}")
  image = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
  x0 = y0 = 0
  cw, ch = size
  if dataset in CENTRE_CROP_1024:
    cw, ch = min(size[0], 1024), min(size[1], 1024)
    x0, y0 = (size[0] - cw) // 2, (size[1] - ch) // 2
  image = image[y0:y0 + ch, x0:x0 + cw]
  if depth is None:
    return CanonicalSample(image, None, (x0, y0), tuple(size))
  depth = resize_nearest(depth, size, nearest_rule)[y0:y0 + ch, x0:x0 + cw]
  lo, hi = DATASET_DEPTH_RANGES.get(dataset, (0.0, np.inf))
  depth = np.where((depth >= lo) & (depth <= hi), depth, 0.0).astype(np.float32)
  if not np.any(depth > 0):
    raise SampleError("no_valid_depth", f"{record.source}: no valid depth pixel in [{lo}, {hi}] m")
  return CanonicalSample(image, depth, (x0, y0), tuple(size))


def load_sample(record: RGBDRecord, image_root: str | pathlib.Path, depth_root: str | pathlib.Path,
                dataset: str, nearest_rule: str = "centre", default_depth_scale: float | None = OFFICIAL_DEPTH_SCALE,
                exif_transpose: bool = True, masks: bool = True) -> CanonicalSample:
  """Reads and focal-unifies one RGB-D record (raises `SampleError` with a skip reason).

  Args:
    nearest_rule: depth and mask resize rule (`NEAREST_RULES`).
    default_depth_scale: used when the record has no `depth_scale`; None refuses such a record.
    exif_transpose: apply the JPEG EXIF orientation (the official loader does not).
    masks: apply `mask_valid_path` / `mask_transp_path` (the official sparse evaluation does not).
  """
  scale = record.depth_scale if record.depth_scale is not None else default_depth_scale
  if scale is None:
    raise SampleError("bad_record", f"{record.source}: no depth_scale (raw value / depth_scale = metres; e.g. 1000 "
                      "for millimetre PNGs, 256 for LiDAR PNGs); refusing to guess")
  rgb = load_rgb(resolve_path(image_root, record.image), exif_transpose)
  if record.depth_path is None:
    raise SampleError("missing_depth", f"{record.source}: record has no depth_path")
  depth = load_depth(resolve_path(depth_root, record.depth_path), scale, record.depth_format,
                     record.original_depth_size or record.original_rgb_size)
  if masks and record.mask_valid_path:
    m = load_mask(resolve_path(depth_root, record.mask_valid_path))
    depth = np.where(resize_nearest(m.astype(np.float32), depth.shape[::-1], nearest_rule) > 0, depth, 0.0)
  if masks and record.mask_transp_path:  # iBims-1: 0 marks transparent/invalid surfaces
    m = load_mask(resolve_path(depth_root, record.mask_transp_path))
    depth = np.where(resize_nearest(m.astype(np.float32), depth.shape[::-1], nearest_rule) == 0, 0.0, depth)
  return unify_focal(rgb, depth.astype(np.float32), record, dataset, nearest_rule)
