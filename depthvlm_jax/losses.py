"""DepthVLM losses as (sum, count) pairs: accumulate both over micro-batches, divide once.

* Depth: SILog per image, then the mean over images that have at least one valid pixel
  (hanxunyu/DepthVLM `Qwen3VLForConditionalGeneration._silog_loss` and its per-sample loop).
* Language: next-token cross-entropy in float32, ignoring label -100 (HF `ForCausalLMLoss`: the
  shift happens here, labels are aligned with the inputs).
* Total: lm + w * depth; either alone when the other is absent (the official rule).

Counts are returned as float32 so they can share a `lax.scan` carry with the sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from depthvlm_jax.model.resize import resize_bilinear_align_corners

IGNORE_INDEX = -100
SILOG_LAMBDA = 0.5
SILOG_EPS = 1e-8


def silog_per_image(pred: jax.Array, gt: jax.Array, valid_mask: jax.Array | None = None,
                    lambda_: float = SILOG_LAMBDA) -> tuple[jax.Array, jax.Array]:
  """SILog of every image and whether it had any valid pixel.

  Args:
    pred: (B, Hp, Wp) predicted depth; resized to the GT size (bilinear, align_corners=True) when
      the sizes differ.
    gt: (B, H, W) ground-truth depth; <= 0 means invalid.
    valid_mask: optional bool mask broadcastable to (B, H, W) (e.g. (B, 1, 1) per-image flags).
    lambda_: scale-invariance weight (0.5).

  Returns:
    (loss (B,) float32, has_valid (B,) bool). loss = sqrt(mean(d^2) - lambda * mean(d)^2 + 1e-8)
    with d = log(pred) - log(gt) over valid pixels (gt > 0, pred > 0, mask); meaningless (but
    finite, with finite gradients) where has_valid is False.
  """
  if pred.ndim != 3 or gt.ndim != 3 or pred.shape[0] != gt.shape[0]:
    raise ValueError(f"expected pred (B, Hp, Wp) and gt (B, H, W), got {pred.shape} and {gt.shape}")
  pred = pred.astype(jnp.float32)
  gt = gt.astype(jnp.float32)
  if pred.shape[1:] != gt.shape[1:]:
    pred = resize_bilinear_align_corners(pred[..., None], gt.shape[1:])[..., 0]
  valid = (gt > 0) & (pred > 0)
  if valid_mask is not None:
    valid = valid & jnp.broadcast_to(valid_mask.astype(bool), gt.shape)
  # Invalid pixels read log(1) - log(1) = 0, so neither the value nor the gradient sees NaN/inf.
  d = jnp.where(valid, jnp.log(jnp.where(valid, pred, 1.0)) - jnp.log(jnp.where(valid, gt, 1.0)), 0.0)
  n = valid.sum(axis=(1, 2)).astype(jnp.float32)
  denom = jnp.maximum(n, 1.0)
  mean_d = d.sum(axis=(1, 2)) / denom
  mean_d2 = jnp.square(d).sum(axis=(1, 2)) / denom
  radicand = jnp.maximum(mean_d2 - lambda_ * jnp.square(mean_d), 0.0) + SILOG_EPS
  return jnp.sqrt(radicand), n > 0


def silog_loss(pred: jax.Array, gt: jax.Array, valid_mask: jax.Array | None = None,
               lambda_: float = SILOG_LAMBDA) -> tuple[jax.Array, jax.Array]:
  """Sum of per-image SILog over images with >= 1 valid pixel, and how many there were.

  Args: as `silog_per_image`.

  Returns:
    (loss_sum, num_images), float32 scalars; the batch loss is loss_sum / num_images (images without
    a valid pixel contribute nothing and are not counted).
  """
  loss, has_valid = silog_per_image(pred, gt, valid_mask, lambda_)
  return jnp.where(has_valid, loss, 0.0).sum(), has_valid.sum().astype(jnp.float32)


def silog_mean(pred: jax.Array, gt: jax.Array, valid_mask: jax.Array | None = None,
               lambda_: float = SILOG_LAMBDA) -> jax.Array:
  """Mean SILog over images with a valid pixel (0 when there is none)."""
  total, count = silog_loss(pred, gt, valid_mask, lambda_)
  return total / jnp.maximum(count, 1.0)


def _token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(..., V) logits and (...) targets (-100 = ignore) -> (sum NLL, count), float32."""
  logits = logits.astype(jnp.float32)
  mask = targets != IGNORE_INDEX
  safe = jnp.where(mask, targets, 0)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  nll = jnp.where(mask, lse - tgt, 0.0)
  return nll.sum(), mask.sum().astype(jnp.float32)


def lm_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy, summed, with the number of supervised tokens.

  The shift happens here (HF convention): `logits[:, t]` predicts `labels[:, t + 1]`, so `labels`
  are aligned with `input_ids` (-100 at prompt, pad and image positions). The last position has no
  target. Computed in float32 whatever the logits dtype.

  Args:
    logits: (B, L, V).
    labels: (B, L) int, -100 = ignore.

  Returns:
    (loss_sum, num_tokens), float32 scalars; mean CE = loss_sum / num_tokens.
  """
  if logits.shape[:2] != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree on (B, L)")
  return _token_nll(logits[:, :-1], labels[:, 1:])


def lm_cross_entropy_from_hidden(hidden: jax.Array, lm_head_kernel: jax.Array, labels: jax.Array,
                                 chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
  """`lm_cross_entropy(hidden @ lm_head_kernel, labels)` without materialising (B, L, V) logits.

  The sequence is cut into chunks of `chunk_size` positions; each chunk's logits are computed,
  reduced and dropped, and recomputed in the backward pass (`jax.checkpoint`), so peak memory is
  one (B, chunk, V) float32 block instead of the whole (B, L, V).

  Args:
    hidden: (B, L, D) final hidden states (after the final norm).
    lm_head_kernel: (D, V) LM head kernel (our layout: torch weight transposed).
    labels: (B, L) int aligned with the inputs, -100 = ignore (shifted here as in `lm_cross_entropy`).
    chunk_size: positions per chunk (the last chunk is padded with ignored targets).

  Returns:
    (loss_sum, num_tokens), float32 scalars.
  """
  b, length, d = hidden.shape
  if labels.shape != (b, length):
    raise ValueError(f"hidden {hidden.shape} and labels {labels.shape} disagree on (B, L)")
  h = hidden[:, :-1]
  t = labels[:, 1:]
  n = length - 1
  chunk = max(1, min(chunk_size, n))
  pad = (-n) % chunk
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  t = jnp.pad(t, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
  k = (n + pad) // chunk
  h = h.reshape(b, k, chunk, d).swapaxes(0, 1)  # (K, B, chunk, D)
  t = t.reshape(b, k, chunk).swapaxes(0, 1)  # (K, B, chunk)

  @jax.checkpoint
  def chunk_nll(hc, tc):
    logits = jnp.einsum("bcd,dv->bcv", hc, lm_head_kernel.astype(hc.dtype))
    return _token_nll(logits, tc)

  def body(carry, xs):
    s, c = chunk_nll(*xs)
    return (carry[0] + s, carry[1] + c), None

  zero = jnp.zeros((), jnp.float32)
  (total, count), _ = jax.lax.scan(body, (zero, zero), (h, t))
  return total, count


def total_loss(lm: jax.Array | None, depth: jax.Array | None, weight: float = 1.0) -> jax.Array | None:
  """The official combination: lm + weight * depth; `lm` alone, or `depth` alone (unweighted, as in
  the reference), when the other is None; None when both are."""
  if lm is not None and depth is not None:
    return lm + weight * depth
  if depth is not None:
    return depth
  return lm
