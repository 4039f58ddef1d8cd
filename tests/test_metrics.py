"""Depth metrics equal plain NumPy references on random arrays with invalid pixels."""

import numpy as np
import pytest

from depthvlm_jax.evaluation import metrics


def _numpy_reference(p, g):
  m = (g > 0) & (p > 0)
  p, g = p[m].astype(np.float64), g[m].astype(np.float64)
  r = np.maximum(p / g, g / p)
  d = np.log(p) - np.log(g)
  return {"delta1": np.mean(r < 1.25), "delta2": np.mean(r < 1.5625), "delta3": np.mean(r < 1.953125),
          "abs_rel": np.mean(np.abs(p - g) / g), "sq_rel": np.mean((p - g)**2 / g),
          "rmse": np.sqrt(np.mean((p - g)**2)), "rmse_log": np.sqrt(np.mean(d**2)),
          "silog": np.sqrt(np.mean(d**2) - np.mean(d)**2) * 100}


def test_metrics_match_numpy():
  rng = np.random.default_rng(0)
  gt = rng.uniform(0.5, 20, (3, 17, 23)).astype(np.float32)
  gt[rng.random(gt.shape) < 0.2] = 0
  pred = (gt * rng.uniform(0.6, 1.6, gt.shape)).astype(np.float32)
  pred[0, :2] = 0  # invalid predictions are excluded too
  pred[2] = np.where(gt[2] > 0, pred[2], 3.0)
  got = metrics.depth_metrics_per_image(pred, gt)
  for i in range(3):
    ref = _numpy_reference(pred[i], gt[i])
    for k in metrics.METRIC_NAMES:
      np.testing.assert_allclose(float(got[k][i]), ref[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_perfect_prediction_and_empty_images():
  gt = np.zeros((2, 4, 4), np.float32)
  gt[0] = 2.0
  got = metrics.depth_metrics_per_image(gt, gt)
  assert float(got["delta1"][0]) == 1.0 and float(got["abs_rel"][0]) == 0.0
  assert int(got["count"][1]) == 0 and float(got["delta1"][1]) == 0.0


def test_best_constant():
  maps = [np.full((4, 4), 2.0, np.float32), np.full((4, 4), 2.2, np.float32)]
  c, d1 = metrics.best_constant_delta1(maps)
  assert d1 == 1.0 and 2.2 / 1.25 < c < 2.0 * 1.25


def test_best_constant_streamed_equals_brute_force():
  rng = np.random.default_rng(0)
  maps = [np.where(rng.random((6, 7)) < 0.2, 0.0, rng.uniform(0.5, 20.0, (6, 7))) for _ in range(4)]
  maps.append(np.zeros((3, 3)))  # no valid pixel: left out
  acc = metrics.BestConstant()
  for m in maps:
    acc.add(m)
  c, d1 = acc.best()
  # every candidate's mean per-image δ1 computed directly
  cands = np.exp(acc.lo + np.arange(acc.bins + 1) * acc.width)
  valid = [m[m > 0] for m in maps if np.any(m > 0)]
  direct = np.mean([[np.mean(np.maximum(k / v, v / k) < 1.25) for k in cands] for v in valid], axis=0)
  np.testing.assert_allclose(acc.delta1_sums / acc.images, direct, atol=1e-12)
  assert d1 == pytest.approx(direct.max()) and acc.images == 4
  # summed states of two halves (two processes) give the same answer
  a, b = metrics.BestConstant(), metrics.BestConstant()
  for i, m in enumerate(maps):
    (a if i % 2 else b).add(m)
  assert a.best(a.state() + b.state()) == (c, d1)
