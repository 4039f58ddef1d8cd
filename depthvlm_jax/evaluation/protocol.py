"""DepthVLM-Bench protocol pieces on the host: conventions, coordinate frames, sparse points, dense maps.

Two protocols (`PROTOCOLS`, `CONVENTIONS`; docs/evaluation.md has the full table):
  official: the authors' evaluator (DepthVLM `eval/eval.py` + `utils/datasets.py`) end to end, so the
            paper's numbers can be compared: 28-then-32 preprocessing (`processing.image_processor`),
            system prompt, GT depth upsampled with OpenCV's INTER_NEAREST rule (`rgbd.NEAREST_RULES`),
            the prediction resized to the GT with OpenCV's INTER_LINEAR (`resize_linear_opencv`) for
            dense and indexed at its own resolution for sparse, every `pixel_coords` scaled as RGB
            pixels and rounded, δ1 = 0 for an image without a valid point, missing depth_scale = 1000.
  correct:  our better-aligned conventions: one resize to multiples of 32, pixel-centre nearest GT,
            the prediction resized to the canonical image (bilinear, align_corners=True, the depth
            head's own convention) before any comparison, each record's real coordinate frame with
            pixel-centre scaling, out-of-frame coordinates refused, images without a valid point left
            out of the mean (counted as `empty`), missing depth_scale refused.

Every comparison happens in the *canonical* image (focal length `canonical_fx`, after any centre crop;
`data_pipelines.rgbd.load_sample`). Dense: metrics over every valid pixel of the canonical GT map.
Sparse: each record's `pixel_coords` ([x, y] pairs) are mapped into the canonical image; GT is read
from the canonical GT map at that pixel, falling back to the record's `depth` value where the map is
0; points outside are skipped (official: a point outside the GT map counts as invalid, one outside the
prediction map is dropped).

Coordinate frames. `pixel_coords` are pixel indices of some image of the record: the RGB image
("rgb", `original_rgb_size`) or the depth map ("depth", `original_depth_size`). The released ScanNet++
annotations use depth-map pixels (256x192) while the official evaluator scales every record as if its
coordinates were RGB pixels (1920x1440): official mode does the same (points land in the wrong place
but GT is re-read there, so numbers stay self-consistent). Correct mode picks each record's real frame,
in this order: the record's `pixel_coords_frame` field, the dataset's setting (`--coord_frame
NAME=depth`), the known frame of the dataset kind (`KNOWN_FRAMES`), then "rgb" when the RGB and depth
sizes are equal (frames coincide) or when a coordinate lies outside the depth map (it cannot be a
depth pixel). Anything else is ambiguous (`FrameError`; the evaluator skips the record and says how to
set the frame). A pixel index x maps to the canonical pixel floor((x + 0.5) * Wc / W) (pixel centres).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from etils import epath
from PIL import Image

from data_pipelines import rgbd
from depthvlm_jax.evaluation import metrics
from depthvlm_jax.model.resize import align_corners_taps

PROTOCOLS = ("official", "correct")
COORD_MODES = PROTOCOLS  # the former name of the choice (`evaluate --coords`)
FRAMES = ("rgb", "depth")
MODES = ("sparse", "dense")
# Frame of `pixel_coords` in the released annotations of a dataset kind (checked on the
# ScanNet++ examples: every coordinate lies inside the 256x192 depth map and matches its values).
KNOWN_FRAMES = {"scannetpp": "depth"}
FRAME_FIELD = "pixel_coords_frame"


OFFICIAL_SYSTEM_PROMPT = "You are a helpful assistant."  # the official evaluator's system turn


class FrameError(ValueError):
  """The coordinate frame of a record cannot be decided or contradicts its coordinates."""


@dataclasses.dataclass(frozen=True)
class Conventions:
  """Every choice that differs between the two protocols (see the module docstring)."""

  name: str
  preprocessing: str  # image_processor.PREPROCESSING
  system_prompt: str | None  # system turn before the user turn
  nearest_rule: str  # GT depth / mask upsampling, rgbd.NEAREST_RULES
  default_depth_scale: float | None  # for a record without depth_scale; None: refuse the record
  exif_transpose: bool  # apply the JPEG EXIF orientation
  sparse_masks: bool  # apply mask_valid/mask_transp to the GT map of sparse evaluation
  coords: str  # "official": RGB frame, round(x * Wc / W - crop offset); "correct": real frame, centres
  dense_resize: str  # prediction -> GT map: "opencv_linear" | "align_corners"
  sparse_read: str  # prediction read at points: "native" (its own resolution) | "canonical" (resized)
  empty_counts_zero: bool  # an image without a valid point: δ1 = 0 in the mean (else left out)
  strict_coords: bool  # refuse a record with a coordinate outside its frame (else drop the point)


CONVENTIONS = {
    "official": Conventions("official", "official", OFFICIAL_SYSTEM_PROMPT, "opencv", rgbd.OFFICIAL_DEPTH_SCALE,
                            exif_transpose=False, sparse_masks=False, coords="official", dense_resize="opencv_linear",
                            sparse_read="native", empty_counts_zero=True, strict_coords=False),
    "correct": Conventions("correct", "direct", None, "centre", None, exif_transpose=True, sparse_masks=True,
                           coords="correct", dense_resize="align_corners", sparse_read="canonical",
                           empty_counts_zero=False, strict_coords=True),
}


def conventions(protocol: str) -> Conventions:
  if protocol not in CONVENTIONS:
    raise ValueError(f"protocol={protocol!r}; expected one of {PROTOCOLS}")
  return CONVENTIONS[protocol]


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


@functools.lru_cache(maxsize=256)
def opencv_linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Taps of a 1-D half-pixel linear resize as OpenCV's INTER_LINEAR computes them.

  Source position (o + 0.5) * n_in / n_out - 0.5, clamped to the edge pixels; the fraction is taken in
  float64 and stored as float32 weights (OpenCV's default x86 path, Intel IPP; with IPP off OpenCV takes
  the fraction in float32, up to 2e-3 relative apart at 1000-pixel sizes).

  Returns:
    (i0, i1, w0, w1): int64 (n_out,) source indices and float32 (n_out,) weights.
  """
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  i0 = np.floor(src).astype(np.int64)
  frac = src - i0
  frac[i0 < 0] = 0.0
  i0[i0 < 0] = 0
  frac[i0 >= n_in - 1] = 0.0
  i0 = np.minimum(i0, n_in - 1)
  return i0, np.minimum(i0 + 1, n_in - 1), (1.0 - frac).astype(np.float32), frac.astype(np.float32)


def resize_linear_opencv(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """(H, W) float map -> (H_out, W_out) like `cv2.resize(x, (W_out, H_out), interpolation=cv2.INTER_LINEAR)`
  (horizontal pass, then vertical, float32 arithmetic; equal to OpenCV within a few 1e-6 relative)."""
  x = np.asarray(x, np.float32)
  if x.shape == tuple(out_hw):
    return x.copy()
  i0, i1, w0, w1 = opencv_linear_taps(x.shape[1], int(out_hw[1]))
  x = x[:, i0] * w0 + x[:, i1] * w1
  i0, i1, w0, w1 = opencv_linear_taps(x.shape[0], int(out_hw[0]))
  return (x[i0] * w0[:, None] + x[i1] * w1[:, None]).astype(np.float32)


@functools.lru_cache(maxsize=4096)
def _image_header_size(path: str) -> tuple[int, int]:
  with epath.Path(path).open("rb") as f, Image.open(f) as im:  # local or object store
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


def check_coordinates(record: rgbd.RGBDRecord, frame: str, frame_wh: tuple[int, int]) -> None:
  """Raises `FrameError` when a coordinate is negative, not finite or beyond the frame (correct protocol)."""
  c = np.asarray(record.pixel_coords, np.float64).reshape(-1, 2)
  w, h = frame_wh
  with np.errstate(invalid="ignore"):
    bad = ~((c[:, 0] >= 0) & (c[:, 0] < w) & (c[:, 1] >= 0) & (c[:, 1] < h))
  if bad.any():
    first = c[int(np.argmax(bad))].tolist()
    raise FrameError(f"{record.source}: {int(bad.sum())} of {len(c)} pixel_coords lie outside the {frame} image "
                     f"{w}x{h} (first {first}); expected 0 <= x < {w} and 0 <= y < {h}")


def canonical_points(coords: np.ndarray, frame_wh: tuple[int, int], sample: rgbd.CanonicalSample,
                     rule: str) -> np.ndarray:
  """(N, 2) [x, y] in the frame's pixels -> (N, 2) int64 [x, y] pixels of the canonical (cropped) image.

  rule "official": x * (Wc / W) minus the centre-crop offset taken as (Wc - crop W) / 2 (a float, so
  half a pixel off the crop of an odd margin), rounded half to even. "correct": the canonical pixel
  whose area holds the centre of pixel x, floor((x + 0.5) * Wc / W), minus the integer crop offset.
  """
  c = np.asarray(coords, np.float64).reshape(-1, 2)
  scale = np.asarray(sample.size_before_crop, np.float64) / np.asarray(frame_wh, np.float64)
  if rule == "official":
    crop_wh = np.asarray(sample.image.shape[1::-1], np.float64)
    offset = (np.asarray(sample.size_before_crop, np.float64) - crop_wh) / 2.0
    return np.round(c * scale - offset).astype(np.int64)
  return (np.floor((c + 0.5) * scale) - np.asarray(sample.crop_offset)).astype(np.int64)


def sparse_values(pred: np.ndarray, gt_map: np.ndarray, points: np.ndarray, jsonl_depth):
  """Prediction and GT at canonical `points` (pred at the canonical size): GT from the map, else the
  jsonl value; points outside the image are skipped.

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


def sparse_values_official(pred: np.ndarray, gt_map: np.ndarray, points: np.ndarray, jsonl_depth):
  """The official reading: GT from the canonical map (jsonl value where the map is 0; 0, i.e. invalid,
  outside the map), the prediction indexed at its own resolution; points outside the prediction are
  dropped.

  Returns (pred (M,), gt (M,), num_dropped).
  """
  x, y = points[:, 0], points[:, 1]
  h, w = gt_map.shape
  in_gt = (x >= 0) & (x < w) & (y >= 0) & (y < h)
  g = np.zeros(len(points), np.float32)
  g[in_gt] = gt_map[y[in_gt], x[in_gt]]
  if jsonl_depth is not None:
    fallback = in_gt & ~(g > 0)
    g[fallback] = np.asarray(jsonl_depth, np.float32)[fallback]
  ph, pw = pred.shape
  in_pred = (x >= 0) & (x < pw) & (y >= 0) & (y < ph)
  return pred[y[in_pred], x[in_pred]].astype(np.float32), g[in_pred], int((~in_pred).sum())


@dataclasses.dataclass(frozen=True)
class FrameChoice:
  frame: str
  why: str
  size: tuple[int, int]  # (W, H) of the frame image


def has_sparse(record: rgbd.RGBDRecord, conv: Conventions) -> bool:
  """Whether a record is evaluated at points (official: needs both `pixel_coords` and `depth`)."""
  return bool(record.pixel_coords) and (record.depth is not None or conv.name != "official")


def image_results(pred: np.ndarray, sample: rgbd.CanonicalSample, record: rgbd.RGBDRecord, modes,
                  conv: Conventions, frame: FrameChoice | None, sparse_gt: np.ndarray | None = None) -> dict:
  """Per-image metrics: {"dense": {...}, "sparse": {..., "frame", "points", "outside"}} for `modes`.

  Args:
    pred: (Hp, Wp) prediction in metres at the predictor's own resolution (a model: the processed
      image; a baseline may give the canonical size).
    sample: the canonical GT sample.
    record: its annotation record.
    modes: subset of ("sparse", "dense"); sparse only for records with `pixel_coords` (`has_sparse`).
    conv: the protocol's `Conventions`.
    frame: the record's coordinate frame (needed for sparse).
    sparse_gt: (Hc, Wc) GT map for sparse points when it differs from `sample.depth` (official:
      without masks).
  """
  pred = np.asarray(pred, np.float32)
  gt = sample.depth
  out = {}
  at_canonical = None
  if conv.dense_resize == "align_corners" or conv.sparse_read == "canonical":
    at_canonical = resize_map(pred, gt.shape)
  if "dense" in modes:
    dense_pred = resize_linear_opencv(pred, gt.shape) if conv.dense_resize == "opencv_linear" else at_canonical
    out["dense"] = metrics.image_metrics(dense_pred, gt)
  if "sparse" in modes and frame is not None and has_sparse(record, conv):
    pts = canonical_points(np.asarray(record.pixel_coords), frame.size, sample, conv.coords)
    gmap = gt if sparse_gt is None else sparse_gt
    if conv.sparse_read == "native":
      p, g, outside = sparse_values_official(pred, gmap, pts, record.depth)
    else:
      p, g, outside = sparse_values(at_canonical, gmap, pts, record.depth)
    out["sparse"] = dict(metrics.sparse_metrics(p, g), frame=frame.frame, points=len(pts), outside=outside)
  return out


def empty_results(record: rgbd.RGBDRecord, modes, conv: Conventions, frame: FrameChoice | None) -> dict:
  """Results of an image whose GT has no valid pixel (official protocol: δ1 = 0 in every mode)."""
  zero = {k: 0.0 for k in metrics.METRIC_NAMES}
  zero["count"] = 0
  out = {}
  if "dense" in modes:
    out["dense"] = dict(zero)
  if "sparse" in modes and frame is not None and has_sparse(record, conv):
    out["sparse"] = dict(zero, frame=frame.frame, points=len(record.pixel_coords), outside=0)
  return out
