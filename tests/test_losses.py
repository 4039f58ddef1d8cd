"""Losses against NumPy / PyTorch references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthvlm_jax.losses import (lm_cross_entropy, lm_cross_entropy_from_hidden, silog_loss, silog_mean,
                                 silog_per_image, total_loss)


def numpy_silog(pred, gt, mask):
  """Per-image SILog over valid pixels, mean over images that have any (the official loop)."""
  if pred.shape != gt.shape:
    pred = F.interpolate(torch.from_numpy(pred)[:, None], size=gt.shape[1:], mode="bilinear",
                         align_corners=True)[:, 0].numpy()
  losses = []
  for p, g, m in zip(pred.astype(np.float64), gt.astype(np.float64), mask):
    valid = (g > 0) & (p > 0) & m
    if valid.sum() == 0:
      continue
    d = np.log(p[valid]) - np.log(g[valid])
    losses.append(np.sqrt(np.mean(d ** 2) - 0.5 * np.mean(d) ** 2 + 1e-8))
  return float(np.sum(losses)), len(losses)


def depth_batch(seed, pred_hw=(12, 16), gt_hw=(20, 30), b=4):
  rng = np.random.default_rng(seed)
  pred = rng.uniform(0.2, 10.0, size=(b, *pred_hw)).astype(np.float32)
  pred[0, :3] = -1.0  # non-positive predictions are invalid
  gt = rng.uniform(0.5, 8.0, size=(b, *gt_hw)).astype(np.float32)
  gt[rng.random(gt.shape) < 0.3] = 0.0
  gt[2] = 0.0  # an image without any valid pixel
  mask = rng.random(gt.shape) < 0.8
  return pred, gt, mask


@pytest.mark.parametrize("pred_hw", [(12, 16), (20, 30)])
def test_silog_matches_numpy(pred_hw):
  pred, gt, mask = depth_batch(0, pred_hw)
  want_sum, want_n = numpy_silog(pred, gt, mask)
  got_sum, got_n = jax.jit(silog_loss)(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(mask))
  assert float(got_n) == want_n == 3
  np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-5)
  np.testing.assert_allclose(float(silog_mean(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(mask))),
                             want_sum / want_n, rtol=1e-5)


def test_silog_mask_broadcast_and_no_valid_image():
  pred, gt, _ = depth_batch(1)
  per_image = np.array([True, False, True, True])[:, None, None]  # (B, 1, 1)
  got_sum, got_n = silog_loss(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(per_image))
  want_sum, want_n = numpy_silog(pred, gt, np.broadcast_to(per_image, gt.shape))
  assert float(got_n) == want_n == 2
  np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-5)
  _, has_valid = silog_per_image(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(per_image))
  assert has_valid.tolist() == [True, False, False, True]
  zero_sum, zero_n = silog_loss(jnp.asarray(pred), jnp.zeros_like(jnp.asarray(gt)))
  assert float(zero_sum) == 0.0 and float(zero_n) == 0.0
  assert float(silog_mean(jnp.asarray(pred), jnp.zeros_like(jnp.asarray(gt)))) == 0.0


def test_silog_gradient_finite_and_correct():
  pred, gt, mask = depth_batch(2)
  pred_t = torch.from_numpy(pred).double().requires_grad_()
  resized = F.interpolate(pred_t[:, None], size=gt.shape[1:], mode="bilinear", align_corners=True)[:, 0]
  losses = []
  for p, g, m in zip(resized, torch.from_numpy(gt).double(), torch.from_numpy(mask)):
    valid = (g > 0) & (p > 0) & m
    if valid.any():
      d = torch.log(p[valid]) - torch.log(g[valid])
      losses.append(torch.sqrt((d ** 2).mean() - 0.5 * d.mean() ** 2 + 1e-8))
  torch.stack(losses).mean().backward()
  g = jax.grad(silog_mean)(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(mask))
  assert bool(jnp.all(jnp.isfinite(g)))
  np.testing.assert_allclose(np.asarray(g), pred_t.grad.numpy(), rtol=1e-4, atol=1e-9)
  same = jnp.asarray(gt[:1]) + 1.0  # a perfect prediction: the radicand is just the 1e-8
  np.testing.assert_allclose(float(silog_mean(same, same)), 1e-4, rtol=1e-3)
  assert bool(jnp.all(jnp.isfinite(jax.grad(silog_mean)(same, same))))
  g0 = jax.grad(silog_mean)(jnp.asarray(pred), jnp.zeros_like(jnp.asarray(gt)))  # no supervision at all
  assert bool(jnp.all(g0 == 0))


def test_lm_cross_entropy_matches_torch():
  rng = np.random.default_rng(0)
  b, length, v = 3, 9, 37
  logits = rng.normal(size=(b, length, v)).astype(np.float32) * 3
  labels = rng.integers(0, v, size=(b, length))
  labels[rng.random(labels.shape) < 0.4] = -100
  labels[2] = -100
  want = F.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, v), torch.from_numpy(labels[:, 1:]).reshape(-1),
                         ignore_index=-100, reduction="sum")
  got_sum, got_n = jax.jit(lm_cross_entropy)(jnp.asarray(logits), jnp.asarray(labels))
  assert float(got_n) == float((labels[:, 1:] != -100).sum())
  np.testing.assert_allclose(float(got_sum), float(want), rtol=1e-6)
  bf_sum, bf_n = lm_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
  assert bf_sum.dtype == jnp.float32 and float(bf_n) == float(got_n)
  np.testing.assert_allclose(float(bf_sum), float(want), rtol=2e-2)
  none_sum, none_n = lm_cross_entropy(jnp.asarray(logits), jnp.full(labels.shape, -100))
  assert float(none_sum) == 0.0 and float(none_n) == 0.0


@pytest.mark.parametrize("chunk", [1, 3, 8, 100])
def test_chunked_cross_entropy_matches_full(chunk):
  rng = np.random.default_rng(1)
  b, length, d, v = 2, 9, 8, 23
  hidden = jnp.asarray(rng.normal(size=(b, length, d)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(d, v)).astype(np.float32))
  labels = rng.integers(0, v, size=(b, length))
  labels[rng.random(labels.shape) < 0.3] = -100
  labels = jnp.asarray(labels)
  full = lambda h, k: lm_cross_entropy(jnp.einsum("bld,dv->blv", h, k), labels)
  chunked = lambda h, k: lm_cross_entropy_from_hidden(h, k, labels, chunk_size=chunk)
  (fs, fn), (cs, cn) = full(hidden, kernel), chunked(hidden, kernel)
  assert float(fn) == float(cn)
  np.testing.assert_allclose(float(cs), float(fs), rtol=1e-6)
  gf = jax.grad(lambda h, k: full(h, k)[0], argnums=(0, 1))(hidden, kernel)
  gc = jax.grad(lambda h, k: chunked(h, k)[0], argnums=(0, 1))(hidden, kernel)
  for a, b_ in zip(gf, gc):
    np.testing.assert_allclose(np.asarray(b_), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_total_loss_rule():
  lm, depth = jnp.float32(2.0), jnp.float32(3.0)
  assert float(total_loss(lm, depth, 0.5)) == 3.5
  assert float(total_loss(lm, None, 0.5)) == 2.0
  assert float(total_loss(None, depth, 0.5)) == 3.0  # depth alone is not weighted (official rule)
  assert total_loss(None, None) is None
