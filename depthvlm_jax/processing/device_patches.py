"""The image processor's normalise-and-patchify step inside a jitted program, from uint8 pixels.

Training batches carry each image as uint8 RGB in its bucket's shape, `pixels` (B, H, W, 3), with
the image's own patch grid `image_grid_hw` (B, 2): the image (with the pipeline's grey padding up
to whole merge blocks) fills the top-left (gh * patch, gw * patch) pixels. `patches_from_pixels`
turns them into the `pixel_values` (B, (H / patch) * (W / patch), C * T * patch * patch) float32
the vision tower takes: each image's rows in merge-block order of its own grid, repeated over the
T temporal slots, and zero rows after its gh * gw patches, the same values, bit for bit, as
`image_processor.normalize_and_patchify` of the image's grid padded with zero rows (`host_patches`).

The normalisation is a 256-entry table per channel, computed with NumPy as the host processor
computes it, so no backend's float contraction (fused multiply-add) can change a value.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from depthvlm_jax.processing.image_processor import ImageProcessorConfig, normalize_and_patchify


def normalisation_table(config: ImageProcessorConfig) -> np.ndarray:
  """(256, 3) float32: the processor's normalised value of every uint8 level in every channel."""
  levels = np.arange(256, dtype=np.uint8)[None, :, None].repeat(3, axis=2)  # (1, 256, 3) as an image
  x = levels.astype(np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
  mean = np.asarray(config.image_mean, np.float32)[:, None, None]
  std = np.asarray(config.image_std, np.float32)[:, None, None]
  return ((x - mean) / std)[:, 0, :].T.copy()


def host_patches(pixels: np.ndarray, grid_hw, config: ImageProcessorConfig = ImageProcessorConfig()) -> np.ndarray:
  """The host processor's rows for one bucket image: `normalize_and_patchify` of its grid's pixels,
  zero rows up to the bucket's patch slots. (H, W, 3) uint8, (gh, gw) -> (slots, patch_dim)."""
  p = config.patch_size
  gh, gw = int(grid_hw[0]), int(grid_hw[1])
  rows, _ = normalize_and_patchify(np.ascontiguousarray(pixels[:gh * p, :gw * p]), config)
  slots = (pixels.shape[0] // p) * (pixels.shape[1] // p)
  return np.pad(rows, ((0, slots - len(rows)), (0, 0)))


def patches_from_pixels(pixels: jax.Array, grid_hw: jax.Array,
                        config: ImageProcessorConfig = ImageProcessorConfig()) -> jax.Array:
  """(B, H, W, 3) uint8 + (B, 2) int grids -> (B, (H / p) * (W / p), 3 * T * p * p) float32 rows.

  Row i of an image with grid (gh, gw) is patch (row, col) of merge block i // m^2 (blocks in row
  order over gw / m block columns), (row, col) within the block from i % m^2; rows i >= gh * gw are
  zero. A grid of width 0 (an empty slot) gives all-zero rows.
  """
  b, h, w, c = pixels.shape
  p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
  if h % (p * m) or w % (p * m) or c != 3:
    raise ValueError(f"pixels of shape {pixels.shape}: expected (B, H, W, 3) with H, W multiples of {p * m}")
  table = jnp.asarray(normalisation_table(config))
  x = table[pixels.astype(jnp.int32), jnp.arange(3)]  # (B, H, W, 3) float32
  gh_all, gw_all = h // p, w // p
  tiles = x.reshape(b, gh_all, p, gw_all, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, gh_all * gw_all, c, p, p)
  i = jnp.arange(gh_all * gw_all)
  block, within = i // (m * m), i % (m * m)
  gh, gw = grid_hw[:, :1].astype(jnp.int32), grid_hw[:, 1:].astype(jnp.int32)  # (B, 1)
  block_cols = jnp.maximum(gw // m, 1)
  row = (block[None] // block_cols) * m + within[None] // m
  col = (block[None] % block_cols) * m + within[None] % m
  valid = i[None] < gh * gw
  src = jnp.where(valid, row * gw_all + col, 0)
  rows = jnp.take_along_axis(tiles, src[:, :, None, None, None], axis=1)  # (B, slots, c, p, p)
  rows = jnp.where(valid[:, :, None, None, None], rows, jnp.float32(0))
  rows = jnp.broadcast_to(rows[:, :, :, None], rows.shape[:3] + (t, p, p))
  return rows.reshape(b, gh_all * gw_all, c * t * p * p)


def model_pixel_values(batch, config: ImageProcessorConfig = ImageProcessorConfig()) -> jax.Array:
  """A batch's `pixel_values`: given as such (the host processor's rows), or from `pixels` uint8
  and `image_grid_hw` (`patches_from_pixels`)."""
  if "pixel_values" in batch:
    return batch["pixel_values"]
  return patches_from_pixels(batch["pixels"], batch["image_grid_hw"], config)


def processor_for(vision_config, base: ImageProcessorConfig = ImageProcessorConfig()) -> ImageProcessorConfig:
  """`base` (mean, std, pixel budget) with the patch geometry of a model's vision config."""
  return dataclasses.replace(base, patch_size=vision_config.patch_size, merge_size=vision_config.spatial_merge_size,
                             temporal_patch_size=vision_config.temporal_patch_size)
