"""Bilinear resizing with `align_corners=True` (torch `F.interpolate(mode="bilinear", align_corners=True)`).

`jax.image.resize` uses half-pixel centres (align_corners=False), which is not what the DepthVLM depth
head and SILog loss use. Here output pixel i samples the input at `i * (n_in - 1) / (n_out - 1)`, so
the corner pixels of input and output coincide.

The sampling positions depend only on the static sizes, so they are computed once on the host in
float32 exactly as torch's CPU kernel does (`area_pixel_compute_scale` / `..._source_index`), and
the resize is two separable passes, one per spatial axis, in a form chosen by the compile target
(`sharding.compile_target`):
- CPU and GPU: gather-and-lerp, O(output) work and memory, exact in float32 (no matmul precision
  involved); the backward pass is a few gathers too (`align_corners_transpose_taps`), not the
  scatter-add autodiff would emit, which is slow on CPU.
- TPU: a matmul with the (n_out, n_in) interpolation matrix (`align_corners_matrix`), as
  `jax.image.resize` does. The TPU compiler turns a gather along a spatial axis into a while loop
  over the output rows (one loop of 1024 trips per 1024-wide map, 72 such loops in the paper
  stage-2 step), which runs row by row and which its cost model counts as one trip; the matmul runs
  on the MXU and is costed as it runs. float32 inputs use HIGHEST precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from depthvlm_jax.sharding import compile_target


@functools.lru_cache(maxsize=256)
def align_corners_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source taps of a 1-D align_corners=True linear resize.

  Args:
    n_in: input length (>= 1).
    n_out: output length (>= 1).

  Returns:
    (i0, i1, lam): int32 (n_out,) left/right source indices and float32 (n_out,) weight of `i1`;
    output[o] = (1 - lam[o]) * x[i0[o]] + lam[o] * x[i1[o]].
  """
  if n_in < 1 or n_out < 1:
    raise ValueError(f"resize sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
  # torch: scale = (in - 1) / (out - 1) in float (0 when out == 1); src = scale * i in float.
  scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0.0)
  src = scale * np.arange(n_out, dtype=np.float32)
  i0 = np.minimum(src.astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = (src - i0.astype(np.float32)).astype(np.float32)
  lam = np.where(i1 == i0, np.float32(0.0), lam).astype(np.float32)
  return i0, i1, lam


@functools.lru_cache(maxsize=256)
def align_corners_transpose_taps(n_in: int, n_out: int, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The transpose of the 1-D resize, optionally after a shift, as a gather.

  For an output-side array g of length `n_out`, the result r of length `n_in` is
  r[i] = sum_o R[o, i] * g[o + shift] (g is 0 outside [0, n_out)), where R (n_out, n_in) is the
  resize matrix. shift = 0 is the plain gradient of the resize; the shifted forms give the kernel
  gradient of a convolution that reads a resized map (`cpu_kernels.conv3x3_of_resized`).

  Returns:
    (idx, wt): int32 and float32 (n_in, K); r[i] = sum_k wt[i, k] * g[idx[i, k]] (padding taps
    have weight 0).
  """
  i0, i1, lam = align_corners_taps(n_in, n_out)
  taps: list[list[tuple[int, float]]] = [[] for _ in range(n_in)]
  for o in range(n_out):
    src = o + shift
    if not 0 <= src < n_out:
      continue
    taps[i0[o]].append((src, float(np.float32(1) - lam[o])))
    if lam[o] != 0:
      taps[i1[o]].append((src, float(lam[o])))
  k = max(1, max(len(t) for t in taps))
  idx = np.zeros((n_in, k), np.int32)
  wt = np.zeros((n_in, k), np.float32)
  for i, t in enumerate(taps):
    for j, (o, w) in enumerate(t):
      idx[i, j], wt[i, j] = o, w
  return idx, wt


@functools.lru_cache(maxsize=256)
def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """The 1-D resize as a float32 (n_out, n_in) matrix: row o holds 1 - lam at i0[o] and lam at i1[o]."""
  i0, i1, lam = align_corners_taps(n_in, n_out)
  m = np.zeros((n_out, n_in), np.float32)
  rows = np.arange(n_out)
  np.add.at(m, (rows, i0), np.float32(1) - lam)
  np.add.at(m, (rows, i1), lam)
  return m


def _resize_axis_matmul(x: jax.Array, n_out: int, axis: int) -> jax.Array:
  """One axis of the resize as a contraction with `align_corners_matrix` (the TPU form)."""
  m = jnp.asarray(align_corners_matrix(x.shape[axis], n_out), x.dtype)
  letters = "abcdefghijklmn"[:x.ndim]
  out = letters[:axis] + "z" + letters[axis + 1:]
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  return jnp.einsum(f"z{letters[axis]},{letters}->{out}", m, x, precision=precision)


def apply_taps(g: jax.Array, taps: tuple[np.ndarray, np.ndarray], axis: int) -> jax.Array:
  """sum_k wt[:, k] * take(g, idx[:, k], axis): a sparse linear map along one axis as K gathers."""
  idx, wt = taps
  shape = [1] * g.ndim
  shape[axis] = idx.shape[0]
  out = None
  for k in range(idx.shape[1]):
    term = jnp.take(g, jnp.asarray(idx[:, k]), axis=axis) * jnp.asarray(wt[:, k].reshape(shape), g.dtype)
    out = term if out is None else out + term
  return out


def _lerp_gather(x: jax.Array, n_out: int, axis: int) -> jax.Array:
  i0, i1, lam = align_corners_taps(x.shape[axis], n_out)
  shape = [1] * x.ndim
  shape[axis] = n_out
  lam = jnp.asarray(lam.reshape(shape), x.dtype)
  x0 = jnp.take(x, jnp.asarray(i0), axis=axis)
  x1 = jnp.take(x, jnp.asarray(i1), axis=axis)
  return x0 * (1 - lam) + x1 * lam


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _resize_axis_op(x: jax.Array, n_out: int, axis: int) -> jax.Array:
  return _lerp_gather(x, n_out, axis)


def _resize_axis_fwd(x, n_out, axis):
  return _lerp_gather(x, n_out, axis), x.shape[axis]


def _resize_axis_bwd(n_out, axis, n_in, g):
  # The autodiff transpose of a gather is a scatter-add, which XLA:CPU runs element by element;
  # each input index receives from at most K nearby outputs, so the transpose is K gathers instead.
  return (apply_taps(g, align_corners_transpose_taps(n_in, n_out), axis),)


_resize_axis_op.defvjp(_resize_axis_fwd, _resize_axis_bwd)


def _resize_axis(x: jax.Array, n_out: int, axis: int) -> jax.Array:
  if x.shape[axis] == n_out:
    return x
  if compile_target() == "tpu":
    return _resize_axis_matmul(x, n_out, axis)
  return _resize_axis_op(x, n_out, axis)


def resize_bilinear_align_corners(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of NHWC maps with align_corners=True.

  Matches `torch.nn.functional.interpolate(x_nchw, size=out_hw, mode="bilinear",
  align_corners=True)` (transposed to NHWC) to float32 rounding.

  Args:
    x: (B, H, W, C) array (any float dtype; the lerp runs in that dtype).
    out_hw: static (H_out, W_out).

  Returns:
    (B, H_out, W_out, C) array of `x.dtype`.
  """
  if x.ndim != 4:
    raise ValueError(f"expected (B, H, W, C), got shape {x.shape}")
  h_out, w_out = (int(s) for s in out_hw)
  x = _resize_axis(x, h_out, axis=1)
  return _resize_axis(x, w_out, axis=2)
