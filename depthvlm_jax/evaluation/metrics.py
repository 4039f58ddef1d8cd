"""Depth metrics over valid pixels (gt > 0 and pred > 0), per image; jit-friendly.

δ1 (the benchmark's headline): fraction of valid points with max(pred/gt, gt/pred) < 1.25.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def delta1_per_image(pred, gt, valid=None):
  """(N, H, W) pred/gt -> (N,) δ1 and (N,) valid-pixel counts (δ1 = 0 where count is 0)."""
  mask = (gt > 0) & (pred > 0)
  if valid is not None:
    mask = mask & valid
  safe_pred = jnp.where(mask, pred, 1.0)
  safe_gt = jnp.where(mask, gt, 1.0)
  ratio = jnp.maximum(safe_pred / safe_gt, safe_gt / safe_pred)
  count = mask.sum(axis=(1, 2))
  hits = ((ratio < 1.25) & mask).sum(axis=(1, 2))
  return hits / jnp.maximum(count, 1), count


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
