"""DepthVLM-Bench protocol pieces on the host: coordinate frames, sparse points, dense maps (SPEC §5).

Every prediction is compared in the *canonical* image (focal length `canonical_fx`, after any centre
crop; `data_pipelines.rgbd.load_sample`): a model's map at the processed resolution is first resized
there (bilinear, align_corners=True, the convention of the depth head and the SILog loss).

Dense mode: metrics over every valid pixel of the canonical GT map.
Sparse mode: each record's `pixel_coords` ([x, y] pairs) are mapped into the canonical image; GT is
read from the canonical GT map at that pixel, falling back to the record's `depth` value where the map
is 0; points outside the image are skipped.

Coordinate frames. `pixel_coords` are pixel indices of some image of the record: the RGB image
("rgb", `original_rgb_size`) or the depth map ("depth", `original_depth_size`). The released ScanNet++
annotations use depth-map pixels (256x192) while the official evaluator scales every record as if its
coordinates were RGB pixels (1920x1440). Two modes:
  official: frame "rgb" for every record and the evaluator's arithmetic (round(x * Wc / W) - offset);
            reproduces the published numbers (points land in the wrong place but GT is re-read there).
  correct:  each record's real frame, chosen in this order: the record's `pixel_coords_frame` field,
            the dataset's setting (`--coord_frame NAME=depth`), the known frame of the dataset kind
            (`KNOWN_FRAMES`), then "rgb" when the RGB and depth sizes are equal (frames coincide) or
            when a coordinate lies outside the depth map (it cannot be a depth pixel). Anything else is
            ambiguous and raises `FrameError` asking for an explicit setting. A pixel index x maps to
            the canonical pixel floor((x + 0.5) * Wc / W) (pixel centres; the same convention as the
            nearest-neighbour depth resize).
One difference from the official script in both modes: it indexes the model's map at the processed
resolution (multiples of 32) with canonical coordinates; here the map is first resized to the
canonical image, so a point reads the prediction of the pixel it names.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image

from data_pipelines import rgbd
from depthvlm_jax.evaluation import metrics
from depthvlm_jax.model.resize import align_corners_taps

COORD_MODES = ("official", "correct")
FRAMES = ("rgb", "depth")
MODES = ("sparse", "dense")
# Frame of `pixel_coords` in the released annotations of a dataset kind (SPEC §5, checked on the
# ScanNet++ examples: every coordinate lies inside the 256x192 depth map and matches its values).
KNOWN_FRAMES = {"scannetpp": "depth"}
FRAME_FIELD = "pixel_coords_frame"


class FrameError(ValueError):
  """The coordinate frame of a record cannot be decided or contradicts its coordinates."""


def resize_map(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """(H, W) float map -> (H_out, W_out), bilinear with align_corners=True, in NumPy (no compile)."""
  x = np.asarray(x, np.float32)
  h, w = x.shape
  if (h, w) != tuple(out_hw):
    i0, i1, lam = align_corners_taps(h, int(out_hw[0]))
    x = x[i0] * (1 - lam)[:, None] + x[i1] * lam[:, None]
    i0, i1, lam = align_corners_taps(w, int(out_hw[1]))
    out = np.empty((x.shape[0], len(i0)), np.float32)
    for r0 in range(0, x.shape[0], 256):  # row chunks: a few temporaries of 256 rows, not of the whole map
      rows = x[r0:r0 + 256]
      out[r0:r0 + 256] = rows[:, i0] * (1 - lam)[None] + rows[:, i1] * lam[None]
    return out
  return x.astype(np.float32)


@functools.lru_cache(maxsize=4096)
def _image_header_size(path: str) -> tuple[int, int]:
  with Image.open(path) as im:
    return im.size


def frame_size(record: rgbd.RGBDRecord, frame: str, image_root, depth_root) -> tuple[int, int]:
  """(W, H) of the image whose pixels `pixel_coords` index: record fields, else the file header."""
  if frame == "rgb":
    if record.original_rgb_size is not None:
      return record.original_rgb_size
    return _image_header_size(str(rgbd.resolve_path(image_root, record.image)))
  if record.original_depth_size is not None:
    return record.original_depth_size
  if record.depth_path is None or record.depth_format != "png":
    raise FrameError(f"{record.source}: frame 'depth' needs original_depth_size")
  return _image_header_size(str(rgbd.resolve_path(depth_root, record.depth_path)))


def choose_frame(record: rgbd.RGBDRecord, coord_mode: str, dataset: str, record_frame: str | None = None,
                 dataset_frame: str | None = None) -> tuple[str, str]:
  """(frame, why) for a record with `pixel_coords` (see the module docstring for the order)."""
  if coord_mode not in COORD_MODES:
    raise ValueError(f"coord_mode={coord_mode!r}; expected one of {COORD_MODES}")
  if coord_mode == "official":
    return "rgb", "official"
  for value, why in ((record_frame, "record"), (dataset_frame, "dataset setting"),
                     (KNOWN_FRAMES.get(dataset), "known for " + dataset)):
    if value is None:
      continue
    if value not in FRAMES:
      raise FrameError(f"{record.source}: {why} gives coordinate frame {value!r}; expected one of {FRAMES}")
    if value == "depth" and _outside_depth(record):
      raise FrameError(f"{record.source}: pixel_coords exceed original_depth_size "
                       f"{list(record.original_depth_size)}, so they cannot be depth-map pixels ({why} says 'depth')")
    return value, why
  if record.original_depth_size is None or record.original_rgb_size in (None, record.original_depth_size):
    return "rgb", "rgb and depth frames coincide"
  if _outside_depth(record):
    return "rgb", "coordinates exceed the depth map"
  raise FrameError(
      f"{record.source}: cannot tell whether pixel_coords are RGB pixels {list(record.original_rgb_size)} or "
      f"depth-map pixels {list(record.original_depth_size)}; set the record field '{FRAME_FIELD}' or the "
      f"dataset's coordinate frame (evaluate --coord_frame NAME=rgb|depth)")


def _outside_depth(record: rgbd.RGBDRecord) -> bool:
  if record.original_depth_size is None or not record.pixel_coords:
    return False
  c = np.asarray(record.pixel_coords)
  w, h = record.original_depth_size
  return bool(np.any(c[:, 0] >= w) or np.any(c[:, 1] >= h))


def canonical_points(coords: np.ndarray, frame_wh: tuple[int, int], sample: rgbd.CanonicalSample,
                     coord_mode: str) -> np.ndarray:
  """(N, 2) [x, y] in the frame's pixels -> (N, 2) int64 [x, y] pixels of the canonical (cropped) image."""
  c = np.asarray(coords, np.float64).reshape(-1, 2)
  scale = np.asarray(sample.size_before_crop, np.float64) / np.asarray(frame_wh, np.float64)
  offset = np.asarray(sample.crop_offset, np.float64)
  if coord_mode == "official":
    return np.round(c * scale - offset).astype(np.int64)
  return (np.floor((c + 0.5) * scale) - offset).astype(np.int64)


def sparse_values(pred: np.ndarray, gt_map: np.ndarray, points: np.ndarray, jsonl_depth):
  """Prediction and GT at canonical `points`: GT from the map, else the jsonl value; outside skipped.

  Returns (pred (M,), gt (M,), num_outside).
  """
  h, w = gt_map.shape
  x, y = points[:, 0], points[:, 1]
  inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
  x, y = x[inside], y[inside]
  g = gt_map[y, x]
  if jsonl_depth is not None:
    g = np.where(g > 0, g, np.asarray(jsonl_depth, np.float32)[inside])
  return pred[y, x], g.astype(np.float32), int((~inside).sum())


@dataclasses.dataclass(frozen=True)
class FrameChoice:
  frame: str
  why: str
  size: tuple[int, int]  # (W, H) of the frame image


def image_results(pred: np.ndarray, sample: rgbd.CanonicalSample, record: rgbd.RGBDRecord, modes,
                  coord_mode: str, frame: FrameChoice | None) -> dict:
  """Per-image metrics: {"dense": {...}, "sparse": {..., "frame", "points", "outside"}} for `modes`.

  Args:
    pred: (Hc, Wc) prediction in metres at the canonical resolution.
    sample: the canonical GT sample.
    record: its annotation record.
    modes: subset of ("sparse", "dense"); sparse only for records with `pixel_coords`.
    coord_mode: "official" | "correct".
    frame: the record's coordinate frame (needed for sparse).
  """
  if pred.shape != sample.depth.shape:
    raise ValueError(f"{record.source}: prediction {pred.shape} != canonical GT {sample.depth.shape}")
  out = {}
  if "dense" in modes:
    out["dense"] = metrics.image_metrics(pred, sample.depth)
  if "sparse" in modes and record.pixel_coords:
    pts = canonical_points(np.asarray(record.pixel_coords), frame.size, sample, coord_mode)
    p, g, outside = sparse_values(pred, sample.depth, pts, record.depth)
    out["sparse"] = dict(metrics.sparse_metrics(p, g), frame=frame.frame, points=len(pts), outside=outside)
  return out
