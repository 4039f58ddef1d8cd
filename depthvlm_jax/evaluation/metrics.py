"""Depth metrics over valid pixels (gt > 0 and pred > 0), per image; jit-friendly.

δ1 (the benchmark's headline): fraction of valid points with max(pred/gt, gt/pred) < 1.25;
δ2, δ3 use 1.25² and 1.25³. AbsRel = mean |p-g|/g, SqRel = mean (p-g)²/g, RMSE, RMSE-log =
sqrt(mean (log p - log g)²), SILog = sqrt(mean d² - mean(d)²)·100 with d = log p - log g (the KITTI
convention, λ = 1). Each image is reduced on its own; datasets average the per-image values.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

METRIC_NAMES = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "silog")


def depth_metrics_per_image(pred, gt, valid=None, xp=jnp) -> dict[str, jnp.ndarray]:
  """(N, H, W) pred/gt (+ optional bool mask) -> {name: (N,)} and "count" (N,) valid pixels.

  `xp=numpy` runs the same formulas on the host (no compilation for each new image size).
  """
  mask = (gt > 0) & (pred > 0)
  if valid is not None:
    mask = mask & valid
  count = mask.sum(axis=(1, 2))
  n = xp.maximum(count, 1).astype(xp.float32)
  p = xp.where(mask, pred, 1.0).astype(xp.float32)
  g = xp.where(mask, gt, 1.0).astype(xp.float32)
  m = mask.astype(xp.float32)
  mean = lambda x: (x * m).sum(axis=(1, 2)) / n
  ratio = xp.maximum(p / g, g / p)
  d = xp.log(p) - xp.log(g)
  out = {
      "delta1": mean(ratio < 1.25),
      "delta2": mean(ratio < 1.25**2),
      "delta3": mean(ratio < 1.25**3),
      "abs_rel": mean(jnp.abs(p - g) / g),
      "sq_rel": mean((p - g)**2 / g),
      "rmse": xp.sqrt(mean((p - g)**2)),
      "rmse_log": xp.sqrt(mean(d**2)),
      "silog": xp.sqrt(xp.maximum(mean(d**2) - mean(d)**2, 0.0)) * 100.0,
  }
  out["count"] = count
  return out


def delta1_per_image(pred, gt, valid=None):
  """(N,) δ1 and (N,) valid-pixel counts (δ1 = 0 where count is 0)."""
  m = depth_metrics_per_image(pred, gt, valid)
  return m["delta1"], m["count"]


def sparse_metrics(pred_at_points: np.ndarray, gt_at_points: np.ndarray) -> dict[str, float]:
  """The same metrics over sparse points of one image (1-D arrays), on the host."""
  return image_metrics(np.asarray(pred_at_points)[None], np.asarray(gt_at_points)[None])


def image_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
  """Metrics of one (H, W) map pair on the host, as Python floats (and the int "count")."""
  out = depth_metrics_per_image(np.asarray(pred, np.float32)[None], np.asarray(gt, np.float32)[None], xp=np)
  return {k: (int(v[0]) if k == "count" else float(v[0])) for k, v in out.items()}


class BestConstant:
  """The constant depth with the highest mean per-image δ1, accumulated one map at a time.

  Memory stays O(candidates) whatever the number of images (the held-out set is streamed). The
  candidates are c_j = exp(log(lo_m) + j·w) with w = log(1.25) / `steps_per_threshold`; a pixel of
  depth v counts for c_j when |log v − log c_j| < log 1.25, i.e. when log v falls in the
  2·`steps_per_threshold` bins of width w around log c_j. So each image costs one histogram of its
  log depths and every candidate's δ1 is a difference of its cumulative sums: exact for every
  candidate (up to ties on a bin edge), with candidates 1.25^(1/steps) apart.
  """

  def __init__(self, lo_m: float = 1e-3, hi_m: float = 1e4, steps_per_threshold: int = 16):
    self.k = int(steps_per_threshold)
    self.width = math.log(1.25) / self.k
    self.lo = math.log(lo_m)
    self.bins = int(math.ceil((math.log(hi_m) - self.lo) / self.width))
    self.delta1_sums = np.zeros(self.bins + 1, np.float64)  # per candidate, over images
    self.images = 0

  def add(self, gt: np.ndarray) -> None:
    """One (H, W) ground-truth map (0 = invalid); a map without a valid pixel is left out."""
    v = np.asarray(gt, np.float64)
    v = v[v > 0]
    if not v.size:
      return
    idx = np.clip(np.floor((np.log(v) - self.lo) / self.width), 0, self.bins - 1).astype(np.int64)
    below = np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=self.bins))])  # pixels in bins < j
    j = np.arange(self.bins + 1)
    inside = below[np.minimum(j + self.k, self.bins)] - below[np.maximum(j - self.k, 0)]
    self.delta1_sums += inside / v.size
    self.images += 1

  def state(self) -> np.ndarray:
    """(candidates + 1,) float64: the per-candidate sums and the image count (summable over processes)."""
    return np.append(self.delta1_sums, self.images)

  def best(self, state: np.ndarray | None = None) -> tuple[float, float]:
    """(constant in metres, its mean per-image δ1), of this accumulator or of a summed `state()`."""
    state = self.state() if state is None else np.asarray(state, np.float64)
    sums, images = state[:-1], state[-1]
    if images == 0:
      raise ValueError("best constant of no image with valid depth")
    j = int(np.argmax(sums))
    return float(math.exp(self.lo + j * self.width)), float(sums[j] / images)


def best_constant_delta1(gts: list[np.ndarray]) -> tuple[float, float]:
  """The constant depth with the highest mean per-image δ1 on these maps: (constant, δ1)."""
  acc = BestConstant()
  for g in gts:
    acc.add(g)
  return acc.best()
