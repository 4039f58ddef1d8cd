"""Depth metrics over valid pixels (gt > 0 and pred > 0), per image; jit-friendly.

δ1 (the benchmark's headline): fraction of valid points with max(pred/gt, gt/pred) < 1.25;
δ2, δ3 use 1.25² and 1.25³. AbsRel = mean |p-g|/g, SqRel = mean (p-g)²/g, RMSE, RMSE-log =
sqrt(mean (log p - log g)²), SILog = sqrt(mean d² - mean(d)²)·100 with d = log p - log g (the KITTI
convention, λ = 1). Each image is reduced on its own; datasets average the per-image values.
"""

from __future__ import annotations

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


def best_constant_delta1(gts: list[np.ndarray], num: int = 400) -> tuple[float, float]:
  """The constant depth with the highest mean per-image δ1 on these maps: (constant, δ1)."""
  valid = [g[g > 0] for g in gts if np.any(g > 0)]
  lo = min(v.min() for v in valid)
  hi = max(v.max() for v in valid)
  best = (0.0, -1.0)
  for c in np.geomspace(lo, hi, num):
    score = float(np.mean([np.mean(np.maximum(c / v, v / c) < 1.25) for v in valid]))
    if score > best[1]:
      best = (float(c), score)
  return best
