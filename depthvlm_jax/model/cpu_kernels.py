"""3x3 convolutions of the DPT head with hand-written gradients that run fast on XLA:CPU.

`conv3x3` takes the kernel gradient of large maps as one matmul (`kernel_grad_3x3`);
`conv3x3_of_resized` forms both gradients of a convolution that reads a bilinear upsample at the
small map's size. Values and every other gradient are XLA's own; tests check both against autodiff.
Layout NHWC, kernels (k, k, in, out).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from depthvlm_jax.model.resize import align_corners_transpose_taps, apply_taps, resize_bilinear_align_corners


def weight_after_input(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`kernel`, unchanged in value, made to depend on `x` so XLA:CPU cannot convert it early.

  XLA:CPU computes bfloat16 matmuls in float32: it converts each bfloat16 weight to a float32
  copy (as does a float32 model reading bfloat16 weights), and its scheduler places those
  converts as soon as their weights exist, at the start of the program, so every copy is alive at
  once: 13.9 GiB of temporaries in the 4B model's stage-1 step at batch 1, 16.7 GB in `predict`
  (`memory_analysis()` and the buffer assignment of the programs compiled for this CPU). An optimization barrier
  does not help (XLA:CPU removes them before scheduling). Adding zero times a (finite) element of
  the layer's input ties each convert to its layer: one layer's copy lives at a time, and the add
  fuses into the convert. XLA does not fold `y * 0` for floats (NaN semantics), so the tie stays.
  Accelerators convert inside their fusions; the model applies this only to one-device XLA:CPU
  programs (`layers.weight_as`): on a multi-device mesh the element would be a cross-device read.
  """
  first = x.reshape(-1)[0]
  zero = jnp.where(jnp.isfinite(first), first, 0) * 0
  return kernel + jax.lax.stop_gradient(zero).astype(kernel.dtype)


def attention_in_query_chunks(attend, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                              max_logits_bytes: int) -> jax.Array:
  """`attend(q, k, v, mask)` (the XLA form of attention, `layers._attention_xla`) over chunks of
  queries (`lax.map`) when its float32 logits would exceed `max_logits_bytes`. Each query row's
  softmax only reads its own logits, so the result is the same; one chunk's logits are held at a
  time. For XLA:CPU, where the XLA form is the kernel (`layers.attention`); accelerators use fused
  kernels, and a loop there would also hide iterations from the TPU cost model.

  Args: as `layers._attention_xla` (mask: bool, broadcastable to (B, 1 or heads, Lq, Lk), or None).
  """
  b, lq, h, _ = q.shape
  lk = k.shape[1]
  row_bytes = b * h * lk * 4
  if lq * row_bytes <= max_logits_bytes or lq < 256:
    return attend(q, k, v, mask)
  chunk = max(128, max_logits_bytes // row_bytes // 128 * 128)
  n = -(-lq // chunk)
  pad = n * chunk - lq
  qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, *q.shape[2:]).swapaxes(0, 1)
  if mask is None:
    out = jax.lax.map(lambda qc: attend(qc, k, v, None), qs)
  else:
    mask = jnp.broadcast_to(mask, (b, mask.shape[1], lq, lk))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)  # padded rows: dropped
    ms = mask.reshape(b, mask.shape[1], n, chunk, lk).transpose(2, 0, 1, 3, 4)
    out = jax.lax.map(lambda a: attend(a[0], k, v, a[1]), (qs, ms))
  return out.swapaxes(0, 1).reshape(b, n * chunk, *out.shape[3:])[:, :lq]


def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'Same' stride-1 convolution, NHWC x (k, k, in, out) kernel, odd k."""
  pad = (kernel.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Below this many output positions XLA's own kernel-gradient convolution is as fast (see `conv3x3`).
FLAT_KERNEL_GRAD_MIN_POSITIONS = 4096


def kernel_grad_3x3(x: jax.Array, g: jax.Array) -> jax.Array:
  """Kernel gradient of the 'same' 3x3 convolution, dK[a, b] = sum_p xpad[p + (a, b)]^T g[p], as one matmul.

  On the zero-padded grid flattened row by row (row length w + 2), tap (a, b) of output position n
  reads input position n + a (w + 2) + b, a plain offset. The three width offsets b are applied to
  the input (side by side: (m, 3C)), the three row offsets a to the output gradient (stacked:
  (3O, m), zero in the grid's padding columns), and a single (3O, m) x (m, 3C) matmul gives all nine
  taps. XLA:CPU runs the autodiff form, a correlation with an (h, w) window and a single input
  feature, far below its matmul speed; slicing one operand per tap instead would copy it each time.

  Args:
    x: (B, h, w, C) convolution input.
    g: (B, h, w, O) output gradient.

  Returns:
    (3, 3, C, O) in the dtype of the product.
  """
  b, h, w, c = x.shape
  row = w + 2
  n = h * row  # output positions on the padded grid (the last two of each row are padding)
  m = n + 2 * row  # positions one operand row offset reaches
  flat = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, (h + 2) * row, c)
  flat = jnp.pad(flat, ((0, 0), (0, 2), (0, 0)))  # the last width offsets run 2 past the end (into zeros of g)
  width_taps = jnp.concatenate([flat[:, j:j + m] for j in range(3)], axis=-1)  # (B, m, 3C)
  g_t = jnp.pad(g, ((0, 0), (0, 0), (0, 2), (0, 0))).reshape(b, n, -1).transpose(0, 2, 1)  # (B, O, n)
  row_taps = jnp.concatenate([jnp.pad(g_t, ((0, 0), (0, 0), (a * row, (2 - a) * row))) for a in range(3)],
                             axis=1)  # (B, 3O, m)
  taps = jnp.einsum("bkm,bmj->kj", row_taps, width_taps)  # (3O, 3C): [(a, o), (b, c)]
  return taps.reshape(3, -1, 3, c).transpose(0, 2, 3, 1)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'Same' 3x3 convolution (B, h, w, C) x (3, 3, C, O) -> (B, h, w, O); for maps of at least
  `FLAT_KERNEL_GRAD_MIN_POSITIONS` positions the kernel gradient is `kernel_grad_3x3`, otherwise
  autodiff's. The value and the input gradient are XLA's convolutions."""
  return conv_same(x, kernel)


def _conv3x3_fwd(x, kernel):
  return conv_same(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, g):
  x, kernel = residuals
  if x.shape[1] * x.shape[2] < FLAT_KERNEL_GRAD_MIN_POSITIONS:
    return jax.vjp(conv_same, x, kernel)[1](g)
  (dx,) = jax.vjp(lambda v: conv_same(v, kernel), x)[1](g)
  return dx, kernel_grad_3x3(x, g).astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_of_resized(y: jax.Array, kernel: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """`conv_same(resize_bilinear_align_corners(y, out_hw), kernel)` with both gradients taken at y's size.

  The DPT head's last two 3x3 convs read bilinear upsamples of half-resolution maps. Autodiff
  would form both gradients at the upsampled size: for a 640x480 image a 307200-position kernel
  correlation (which XLA:CPU runs at a third of its forward-conv speed) and a full-size transposed
  convolution whose (H, W, C) result is then resized down again. With x = R y (R the resize, linear
  and separable) and S_t the shift of kernel tap t = (a, b), the forward is sum_t S_t^-1(x) K_t, so
      T_t = R^T S_t g                  (the output gradient shifted and resized *down*: a few gathers)
      dK_t = sum_q y[q]^T T_t[q]       (C, O)
      dy   = sum_t T_t K_t^T           (B, h, w, C)
  Every product runs at y's size. Same values up to float rounding; the upsampled map is not kept
  for the backward pass either.

  Args:
    y: (B, h, w, C) map before the resize.
    kernel: (3, 3, C, O) in y's dtype.
    out_hw: static (H, W) the map is resized to before the convolution.

  Returns:
    (B, H, W, O).
  """
  return conv_same(resize_bilinear_align_corners(y, out_hw), kernel)


def _conv3x3_of_resized_fwd(y, kernel, out_hw):
  return conv3x3_of_resized(y, kernel, out_hw), (y, kernel)


def _conv3x3_of_resized_bwd(out_hw, residuals, g):
  y, kernel = residuals
  (h_in, w_in), (h_out, w_out) = y.shape[1:3], out_hw
  dk = [[None] * 3 for _ in range(3)]
  dy = None
  for b in range(3):  # width first: it shrinks the array the three height passes read
    g_b = apply_taps(g, align_corners_transpose_taps(w_in, w_out, 1 - b), axis=2)  # (B, H, w, O)
    for a in range(3):
      t = apply_taps(g_b, align_corners_transpose_taps(h_in, h_out, 1 - a), axis=1)  # T_ab: (B, h, w, O)
      dk[a][b] = jnp.einsum("bhwc,bhwo->co", y, t)
      term = jnp.einsum("bhwo,co->bhwc", t, kernel[a, b])
      dy = term if dy is None else dy + term
  return dy.astype(y.dtype), jnp.stack([jnp.stack(row) for row in dk]).astype(kernel.dtype)


conv3x3_of_resized.defvjp(_conv3x3_of_resized_fwd, _conv3x3_of_resized_bwd)
