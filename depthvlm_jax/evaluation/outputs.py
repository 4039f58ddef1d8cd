"""What a depth prediction is turned into for users: files, colours, point clouds.

  * 16-bit PNG in millimetres (0 = invalid, saturates at 65.535 m) and float32 .npy in metres;
  * a Turbo colour map over the 2nd-98th percentile of the valid depths, side by side with the RGB;
  * a coloured point cloud, back-projected with a pinhole camera (fx = fy, principal point at the
    image centre unless given), as a binary little-endian PLY (x, y, z float32; red, green, blue uint8).

Turbo is evaluated with its published degree-5 polynomial fit (Google AI blog "Turbo, an improved
rainbow colormap", 2019; fit by Ruofei Du), a close approximation of the 256-entry table, so no
plotting library is needed.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
from PIL import Image

# Rows: red, green, blue; columns: coefficients of 1, t, t^2, t^3, t^4, t^5.
_TURBO_POLY = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
], np.float64)

PLY_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


def turbo(t: np.ndarray) -> np.ndarray:
  """(...) values in [0, 1] (clipped) -> (..., 3) uint8 Turbo colours."""
  t = np.clip(np.asarray(t, np.float64), 0.0, 1.0)
  powers = np.stack([t**k for k in range(6)], -1)
  rgb = np.clip(powers @ _TURBO_POLY.T, 0.0, 1.0)
  return np.round(rgb * 255).astype(np.uint8)


def percentile_range(depth: np.ndarray, lo: float = 2.0, hi: float = 98.0) -> tuple[float, float]:
  """(low, high) percentiles of the valid (> 0, finite) depths; (0, 1) when there are none."""
  v = depth[np.isfinite(depth) & (depth > 0)]
  if v.size == 0:
    return 0.0, 1.0
  a, b = (float(x) for x in np.percentile(v, [lo, hi]))
  return a, max(b, a + 1e-6)


def colorize_depth(depth: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
  """(H, W) metres -> (H, W, 3) uint8 Turbo image (near = blue, far = red); invalid = black."""
  lo, hi = value_range or percentile_range(depth)
  rgb = turbo((depth - lo) / (hi - lo))
  rgb[~(np.isfinite(depth) & (depth > 0))] = 0
  return rgb


def side_by_side(rgb: np.ndarray, depth: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 RGB and (H', W') depth -> (H, 2W, 3) uint8: RGB | Turbo depth (resized to H x W)."""
  colour = colorize_depth(depth)
  if colour.shape[:2] != rgb.shape[:2]:
    colour = np.asarray(Image.fromarray(colour).resize(rgb.shape[1::-1], Image.Resampling.NEAREST))
  return np.concatenate([rgb, colour], axis=1)


ROWS_PER_CHUNK = 256  # row chunks of the full-resolution writers below: memory independent of the height


def _row_chunks(height: int, rows: int = ROWS_PER_CHUNK):
  for r0 in range(0, height, rows):
    yield r0, min(height, r0 + rows)


def save_depth_png_mm(path: str | pathlib.Path, depth: np.ndarray) -> None:
  """Writes (H, W) metres as a 16-bit PNG of millimetres (rounded; 0 = invalid; clipped to 65535)."""
  mm = np.empty(depth.shape, np.uint16)
  for r0, r1 in _row_chunks(depth.shape[0]):
    d = depth[r0:r1]
    mm[r0:r1] = np.clip(np.where(np.isfinite(d) & (d > 0), np.round(d * 1000.0), 0), 0, 65535).astype(np.uint16)
  Image.fromarray(mm).save(path)


def save_side_by_side(path: str | pathlib.Path, rgb: np.ndarray, depth: np.ndarray,
                      value_range: tuple[float, float] | None = None) -> None:
  """Writes `side_by_side(rgb, depth)` as an image file, colouring row chunks into one PIL image."""
  if depth.shape != rgb.shape[:2]:
    Image.fromarray(side_by_side(rgb, depth)).save(path)
    return
  value_range = value_range or percentile_range(depth)
  h, w = depth.shape
  canvas = Image.new("RGB", (2 * w, h))
  for r0, r1 in _row_chunks(h):
    canvas.paste(Image.fromarray(np.concatenate([rgb[r0:r1], colorize_depth(depth[r0:r1], value_range)], 1)),
                 (0, r0))
  canvas.save(path)


def intrinsics(width: int, height: int, fx: float, fy: float | None = None, cx: float | None = None,
               cy: float | None = None) -> np.ndarray:
  """3x3 pinhole matrix; fy = fx and the principal point at the image centre when not given."""
  return np.array([[fx, 0.0, width / 2.0 if cx is None else cx],
                   [0.0, fx if fy is None else fy, height / 2.0 if cy is None else cy],
                   [0.0, 0.0, 1.0]], np.float64)


def scale_intrinsics(k: np.ndarray, src_wh: tuple[int, int], dst_wh: tuple[int, int]) -> np.ndarray:
  """Intrinsics of an image resized from src (W, H) to dst (W, H)."""
  sx, sy = dst_wh[0] / src_wh[0], dst_wh[1] / src_wh[1]
  return np.diag([sx, sy, 1.0]) @ k


def backproject(depth: np.ndarray, k: np.ndarray, rgb: np.ndarray | None = None):
  """Valid pixels of (H, W) z-depth -> points (N, 3) float32 and colours (N, 3) uint8.

  Pixel (row v, column u) is the ray through its centre (u + 0.5, v + 0.5):
  X = (u + 0.5 - cx) * Z / fx, Y = (v + 0.5 - cy) * Z / fy (x right, y down, z forward).
  """
  valid = np.isfinite(depth) & (depth > 0)
  v, u = np.nonzero(valid)
  z = depth[v, u].astype(np.float64)
  x = (u + 0.5 - k[0, 2]) * z / k[0, 0]
  y = (v + 0.5 - k[1, 2]) * z / k[1, 1]
  points = np.stack([x, y, z], -1).astype(np.float32)
  colours = (rgb[v, u] if rgb is not None else np.full((len(z), 3), 200)).astype(np.uint8)
  return points, colours


def _ply_header(count: int) -> bytes:
  return ("ply\nformat binary_little_endian 1.0\n"
          f"element vertex {count}\n"
          "property float x\nproperty float y\nproperty float z\n"
          "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n").encode("ascii")


def _ply_records(points: np.ndarray, colours: np.ndarray) -> np.ndarray:
  data = np.empty(len(points), PLY_DTYPE)
  for i, name in enumerate("xyz"):
    data[name] = points[:, i]
  for i, name in enumerate(("red", "green", "blue")):
    data[name] = colours[:, i]
  return data


def write_ply(path: str | pathlib.Path, points: np.ndarray, colours: np.ndarray) -> None:
  """Binary little-endian PLY with (x, y, z) float32 and (red, green, blue) uint8 per vertex."""
  if points.shape != colours.shape or points.ndim != 2 or points.shape[1] != 3:
    raise ValueError(f"points {points.shape} and colours {colours.shape} must both be (N, 3)")
  with open(path, "wb") as f:
    f.write(_ply_header(len(points)))
    f.write(_ply_records(points, colours).tobytes())


def point_stride(shape: tuple[int, int], max_points: int) -> int:
  """The pixel stride (every s-th row and column) that keeps an (H, W) image at most `max_points`
  points; 1 when it already is, or when `max_points` is 0 (no limit)."""
  h, w = shape
  if max_points <= 0 or h * w <= max_points:
    return 1
  s = max(1, math.isqrt(h * w // max_points))
  while math.ceil(h / s) * math.ceil(w / s) > max_points:
    s += 1
  return s


def write_ply_from_depth(path: str | pathlib.Path, depth: np.ndarray, k: np.ndarray, rgb: np.ndarray | None = None,
                         max_points: int = 0) -> int:
  """The file of `write_ply(path, *backproject(depth, k, rgb))`, back-projected in row chunks.

  max_points: with more pixels than this, every s-th row and column only (`point_stride`), each point
    still on its own pixel's ray; 0 keeps every pixel.
  Returns the number of points. Memory stays at one chunk's points instead of 15 bytes per pixel.
  """
  s = point_stride(depth.shape[:2], max_points)
  if s > 1:  # pixel u of the subsampled grid is pixel s*u of the image: the same ray, through its centre
    depth, rgb = depth[::s, ::s], None if rgb is None else rgb[::s, ::s]
    k = np.array(k, np.float64)
    k[0, 0], k[1, 1] = k[0, 0] / s, k[1, 1] / s
    k[0, 2], k[1, 2] = (k[0, 2] - 0.5) / s + 0.5, (k[1, 2] - 0.5) / s + 0.5
  count = sum(int(np.count_nonzero(np.isfinite(depth[r0:r1]) & (depth[r0:r1] > 0)))
              for r0, r1 in _row_chunks(depth.shape[0]))
  with open(path, "wb") as f:
    f.write(_ply_header(count))
    for r0, r1 in _row_chunks(depth.shape[0]):
      k_rows = np.array(k, np.float64)
      k_rows[1, 2] -= r0  # the chunk's rows start at r0: same rays as in the whole image
      points, colours = backproject(depth[r0:r1], k_rows, None if rgb is None else rgb[r0:r1])
      f.write(_ply_records(points, colours).tobytes())
  return count


def read_ply(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads a file written by `write_ply`: points (N, 3) float32, colours (N, 3) uint8."""
  raw = pathlib.Path(path).read_bytes()
  end = raw.find(b"end_header\n")
  if not raw.startswith(b"ply\n") or end < 0:
    raise ValueError(f"{path}: not a PLY file (no 'ply' magic or 'end_header')")
  header = raw[:end].decode("ascii").splitlines()
  if "format binary_little_endian 1.0" not in header:
    raise ValueError(f"{path}: expected 'format binary_little_endian 1.0'")
  count = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
  body = raw[end + len(b"end_header\n"):]
  if len(body) != count * PLY_DTYPE.itemsize:
    raise ValueError(f"{path}: {len(body)} bytes of vertex data, expected {count} x {PLY_DTYPE.itemsize}")
  data = np.frombuffer(body, PLY_DTYPE)
  return (np.stack([data[c] for c in "xyz"], -1),
          np.stack([data[c] for c in ("red", "green", "blue")], -1))
