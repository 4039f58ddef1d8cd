"""Depth targets sent to the device as 16-bit codes and one float32 unit per example.

A training example's depth target is `depth` (H, W) uint16 codes and `depth_unit` () float32, the
metres per code; its value in metres is `float32(code) * unit`, one correctly rounded multiply
(the same value on the host, `decode`, and inside a jitted step on any backend); code 0 is an
invalid pixel and decodes to 0. Half the bytes of a float32 map.

Two ways an example gets its codes:

* Integer depth files (16-bit or 8-bit PNG): the map read is integer codes / `depth_scale`, and the
  focal unification and the bucket resize are nearest-neighbour, so the target is still those
  integer codes, divided by `depth_scale` and by the bucket's resize factor s. The codes are sent
  unchanged and the unit is 1 / (depth_scale * s), rounded once to float32 (`unit_for`). Nothing of
  the map is rounded; the decoded value differs from dividing in two steps (code / depth_scale, then
  / s, each rounded to float32) by at most 2 units in the last place of float32 (relative 2.4e-7),
  because a single multiply rounds once where the two divisions rounded twice.
* Any other depth (raw float32 files, converted ArrayRecord examples, or a map that the integer
  check refuses, `integer_codes`): the unit is max depth / 65535 (`fitted`), so the largest depth
  gets code 65535, every other depth the nearest code, and a valid pixel never code 0. The error is
  at most half a unit, max depth / 131070 (0.61 mm for an 80 m maximum), for every depth of at least
  half a unit; a depth below that (a valid pixel under 0.61 mm at 80 m) gets code 1, within one unit.
"""

from __future__ import annotations

import numpy as np

MAX_CODE = 65535


def unit_for(depth_scale: float, resize: float) -> np.float32:
  """Metres per code of an integer map read as code / `depth_scale`, then divided by `resize`
  (the bucket resize factor): 1 / (depth_scale * resize), computed in float64, rounded once."""
  return np.float32(1.0 / (float(depth_scale) * float(resize)))


def integer_codes(depth: np.ndarray, depth_scale: float) -> np.ndarray | None:
  """The (H, W) uint16 codes that a float32 depth map was read from (depth == float32(code) /
  float32(depth_scale) at every pixel), or None when it was not (or a code does not fit 16 bits)."""
  codes = np.rint(np.asarray(depth, np.float64) * float(depth_scale))
  if codes.size and (codes.min() < 0 or codes.max() > MAX_CODE):
    return None
  codes = codes.astype(np.uint16)
  if not np.array_equal(codes.astype(np.float32) / np.float32(depth_scale), depth):
    return None
  return codes


def fitted(depth: np.ndarray) -> tuple[np.ndarray, np.float32]:
  """(codes uint16, unit float32) of any depth map in metres (0 = invalid): unit = max / 65535,
  codes the nearest, at least 1 where the depth is valid (see the module docstring for the error)."""
  depth = np.asarray(depth, np.float32)
  top = float(depth.max(initial=0.0))
  if top <= 0:
    return np.zeros(depth.shape, np.uint16), np.float32(0)
  unit = np.float32(top / MAX_CODE)
  codes = np.clip(np.rint(depth.astype(np.float64) / float(unit)), 1, MAX_CODE)
  return np.where(depth > 0, codes, 0).astype(np.uint16), unit


def decode(codes, unit):
  """Depth in metres from codes (..., H, W) and units (...): float32(code) * unit. NumPy or JAX
  arrays; 0 stays 0 (invalid)."""
  unit = unit if hasattr(unit, "ndim") else np.float32(unit)
  return codes.astype(np.float32) * unit[..., None, None]


def batch_depth(batch):
  """A batch's depth target in metres: `depth` as given (float32), or decoded from uint16 `depth`
  codes with `depth_unit` (`decode`)."""
  if "depth_unit" in batch:
    return decode(batch["depth"], batch["depth_unit"])
  return batch["depth"]
