"""Qwen3-VL vision tower in Flax, batched over padded images (no per-image Python loops).

Reference: HF `transformers` `Qwen3VLVisionModel` (modeling_qwen3_vl.py). The reference packs all
images into one sequence and attends per image through `cu_seqlens`; here every image is its own
row of a padded batch:

  pixel_values  (num_images, max_patches, C*T*P*P)  patches in the processor's order, i.e.
                spatial-merge-block order (2x2 blocks in raster order, each block in raster order),
                then zero padding up to `max_patches` (a multiple of merge_size**2).
  image_grid_hw (num_images, 2) int32: the patch grid (grid_h, grid_w) of each image; (0, 0) marks a
                padding image (no tokens).

Everything else (patch coordinates, bilinear position-embedding taps, 2-D rotary angles, masks) is
derived from `image_grid_hw` inside jit, so one program serves every mix of image sizes that fits
`max_patches`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from depthvlm_jax.model.config import VisionConfig
from depthvlm_jax.model.layers import (AttentionMask, Dense, LayerNorm, apply_rotary, attention, checkpoint_policy,
                                       logical_init, run_blocks)
from depthvlm_jax.sharding import constrain

Dtype = Any


def patch_coordinates(grid_hw: jax.Array, num_patches: int, merge: int):
  """Row/column of every padded patch slot, decoded from the merge-block patch order.

  Args:
    grid_hw: (N, 2) int patch grid per image.
    num_patches: padded patch count per image (static).
    merge: spatial merge size.

  Returns:
    row, col: (N, num_patches) int32; valid: (N, num_patches) bool (slot < h*w).
  """
  h = grid_hw[:, 0:1].astype(jnp.int32)
  w = grid_hw[:, 1:2].astype(jnp.int32)
  j = jnp.arange(num_patches, dtype=jnp.int32)[None, :]
  blocks_w = jnp.maximum(w // merge, 1)
  in_col = j % merge
  in_row = (j // merge) % merge
  block_col = (j // (merge * merge)) % blocks_w
  block_row = j // (merge * merge * blocks_w)
  return block_row * merge + in_row, block_col * merge + in_col, j < h * w


def _bilinear_taps(index: jax.Array, size: jax.Array, side: int):
  """align_corners=True bilinear taps of target `index` on an axis of `size` into a `side` table."""
  src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
  floor = jnp.floor(src)
  taps = jnp.stack([floor, floor + 1], -1).astype(jnp.int32)
  weights = jnp.clip(1.0 - jnp.abs(src[..., None] - taps.astype(jnp.float32)), 0.0, None)
  return jnp.clip(taps, 0, side - 1), weights


def interpolated_position_embedding(table: jax.Array, row, col, grid_hw, side: int) -> jax.Array:
  """Bilinearly resamples the square learned table (side*side, C) to each image's grid.

  Equals `F.interpolate(table.view(side, side, C), (h, w), bilinear, align_corners=True)` read at
  (row, col), as in the reference, whose four corner terms it sums in the same order. Returns
  (N, P, C) float32.

  One gather per corner with (N, P) indices, each kept on the chips of its images (`constrain`): on
  a sharded mesh the partitioner otherwise gathers the whole global batch on every chip for its
  slice of C (the table is FSDP-sharded along C) and transposes the result with an all-to-all, and a
  trailing (2, 2) index axis is padded to a full (8, 128) TPU tile (3.75 GiB of the paper stage-2
  step's temporaries).
  """
  h_taps, h_w = _bilinear_taps(row, grid_hw[:, 0:1], side)
  w_taps, w_w = _bilinear_taps(col, grid_hw[:, 1:2], side)
  table = table.astype(jnp.float32)
  out = None
  for a in range(2):
    for b in range(2):
      idx = constrain(h_taps[..., a] * side + w_taps[..., b], "images", "patches")
      term = jnp.take(table, idx, axis=0) * (h_w[..., a] * w_w[..., b])[..., None]
      term = constrain(term, "images", "patches", "act_embed")
      out = term if out is None else out + term
  return out


def vision_rotary(row: jax.Array, col: jax.Array, head_dim: int, theta: float):
  """2-D axial rotary angles: head_dim/4 frequencies each for rows and columns, then doubled.

  Returns cos, sin: (N, P, head_dim) float32.
  """
  spatial = head_dim // 2
  inv_freq = 1.0 / (theta**(jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
  freqs = jnp.concatenate([row[..., None] * inv_freq, col[..., None] * inv_freq], -1)
  freqs = jnp.concatenate([freqs, freqs], -1)
  return jnp.cos(freqs), jnp.sin(freqs)


class VisionBlock(nn.Module):
  """Pre-LayerNorm block: fused-qkv 2-D-rotary attention, then a GELU(tanh) MLP."""

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    """x: (N, P, D); cos/sin: (N, P, head_dim); mask: `AttentionMask` of the (N, P) real patches."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = constrain(x, "images", "patches", "act_embed")
    y = LayerNorm(c.layer_norm_eps, "vision_embed", name="norm1", **kw)(x)
    x = x + _VisionAttention(c, name="attn", **kw)(y, cos, sin, mask)
    y = LayerNorm(c.layer_norm_eps, "vision_embed", name="norm2", **kw)(x)
    x = x + _VisionMLP(c, name="mlp", **kw)(y)
    return constrain(x, "images", "patches", "act_embed")


class _VisionAttention(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, p, d = x.shape
    qkv = Dense(3 * d, ("vision_embed", "vision_qkv"), name="qkv", **kw)(x)
    q, k, v = jnp.split(qkv.reshape(n, p, 3, c.num_heads, c.head_dim), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    out = attention(q, k, v, mask, c.attention_impl).reshape(n, p, d)
    return Dense(d, ("vision_qkv", "vision_embed"), name="proj", **kw)(out)


class _VisionMLP(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(c.intermediate_size, ("vision_embed", "vision_mlp"), name="linear_fc1", **kw)(x)
    h = jax.nn.gelu(h, approximate=c.hidden_act == "gelu_pytorch_tanh")
    return Dense(c.hidden_size, ("vision_mlp", "vision_embed"), name="linear_fc2", **kw)(h)


class PatchMerger(nn.Module):
  """2x2 spatial merge to the LLM width: LayerNorm → fc1 → GELU(erf) → fc2.

  `postshuffle_norm=False` (main merger) normalises each patch before grouping; True (DeepStack
  mergers) groups 4 patches first and normalises the concatenation.
  """

  config: VisionConfig
  postshuffle_norm: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (N, P, D) -> (N, P / merge**2, out_hidden_size)."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, p, d = x.shape
    unit = c.spatial_merge_size**2
    if self.postshuffle_norm:
      x = LayerNorm(c.layer_norm_eps, "vision_merged", name="norm", **kw)(x.reshape(n, p // unit, unit * d))
    else:
      x = LayerNorm(c.layer_norm_eps, "vision_embed", name="norm", **kw)(x).reshape(n, p // unit, unit * d)
    x = Dense(unit * d, ("vision_merged", "vision_merged_mlp"), name="linear_fc1", **kw)(x)
    x = jax.nn.gelu(x, approximate=False)
    return Dense(c.out_hidden_size, ("vision_merged_mlp", "embed"), name="linear_fc2", **kw)(x)


def block_runs(c: VisionConfig) -> list[range]:
  """The blocks between DeepStack taps, in order: each run ends at a tap or at the last block."""
  ends = sorted({*c.deepstack_visual_indexes, c.depth - 1})
  return [range(start, end + 1) for start, end in zip([0] + [e + 1 for e in ends[:-1]], ends)]


class VisionTower(nn.Module):
  """Patch embed + interpolated absolute positions + rotary blocks + merger + DeepStack mergers."""

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (with remat)
  scan_layers: bool = False  # blocks between DeepStack taps as one lax.scan each (see `run_blocks`)
  scan_tail: int = 0  # blocks of each scanned run applied after its loop (compile-report probe; see `run_blocks`)

  @nn.compact
  def __call__(self, pixel_values: jax.Array, image_grid_hw: jax.Array):
    """Encodes a padded batch of images.

    Args:
      pixel_values: (N, P, C*T*P*P), P a multiple of merge_size**2.
      image_grid_hw: (N, 2) int patch grid per image.

    Returns:
      merged: (N, P/4, out_hidden) image tokens for the LLM.
      deepstack: list of (N, P/4, out_hidden), one per `deepstack_visual_indexes` entry.
      token_valid: (N, P/4) bool, True for real (non-padding) tokens.
    """
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, p, _ = pixel_values.shape
    unit = c.spatial_merge_size**2
    if p % unit:
      raise ValueError(f"pixel_values has {p} patch slots per image; must be a multiple of {unit}")
    # Conv3d with kernel == stride is a linear map of the flattened (C, T, P, P) patch.
    x = Dense(c.hidden_size, ("vision_patch", "vision_embed"), name="patch_embed", **kw)(pixel_values)
    row, col, valid = patch_coordinates(image_grid_hw, p, c.spatial_merge_size)
    table = self.param("pos_embed", logical_init(nn.initializers.normal(0.02), ("vision_pos", "vision_embed")),
                       (c.num_position_embeddings, c.hidden_size), self.param_dtype)
    x = x + interpolated_position_embedding(table, row, col, image_grid_hw, c.num_grid_per_side).astype(x.dtype)
    cos, sin = vision_rotary(row, col, c.head_dim, c.rope_theta)
    mask = AttentionMask(valid, kv_prefix=True)  # keys: the image's own real patches (a prefix)
    block_cls = nn.remat(VisionBlock, policy=checkpoint_policy(self.remat_policy)) if self.remat else VisionBlock
    deepstack = []
    for run in block_runs(c):
      x = run_blocks(self, [block_cls(c, name=f"blocks_{i}", **kw) for i in run],
                     VisionBlock(c, parent=None, **kw), lambda block, h: block(h, cos, sin, mask), x,
                     scan=self.scan_layers, remat=self.remat, remat_policy=self.remat_policy, tail=self.scan_tail)
      end = run[-1]
      if end in c.deepstack_visual_indexes:
        k = c.deepstack_visual_indexes.index(end)
        deepstack.append(PatchMerger(c, True, name=f"deepstack_merger_list_{k}", **kw)(x))
    merged = PatchMerger(c, False, name="merger", **kw)(x)
    token_valid = valid.reshape(n, p // unit, unit)[..., 0]
    return merged, deepstack, token_valid
