"""Host-side assembly of static-shape model inputs from tokenised samples and processed images."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.rope_index import get_rope_index


def pad_images(patches: Sequence[np.ndarray], grids: Sequence[Sequence[int]], patch_dim: int,
               max_patches: int | None = None, num_images: int | None = None):
  """Pads per-image patch arrays (h*w, patch_dim) into (N, P, patch_dim) + grids (N, 2).

  Extra image slots (up to `num_images`) get grid (0, 0) and zero patches.
  """
  counts = [int(g[0]) * int(g[1]) for g in grids]
  p = max(counts, default=4) if max_patches is None else max_patches
  p = -(-p // 4) * 4
  n = len(patches) if num_images is None else num_images
  if any(c > p for c in counts) or len(patches) > n:
    raise ValueError(f"images need up to {max(counts)} patches / {len(patches)} slots; "
                     f"bucket has {p} patches / {n} slots")
  pixel_values = np.zeros((n, p, patch_dim), np.float32)
  grid_hw = np.zeros((n, 2), np.int32)
  for i, (x, g) in enumerate(zip(patches, grids)):
    if x.shape != (counts[i], patch_dim):
      raise ValueError(f"image {i}: patches {x.shape} do not match grid {tuple(g)} x {patch_dim}")
    pixel_values[i, :counts[i]] = x
    grid_hw[i] = g
  return pixel_values, grid_hw


def make_model_inputs(token_ids: Sequence[Sequence[int]], config: Qwen3VLConfig,
                      image_patches: Sequence[np.ndarray] = (), image_grids: Sequence[Sequence[int]] = (),
                      padding_side: str = "left", seq_len: int | None = None, pad_id: int = 151643,
                      max_patches: int | None = None, num_images: int | None = None) -> dict[str, np.ndarray]:
  """Pads a batch of token lists and its images into the arrays `Qwen3VL.__call__` takes.

  Args:
    token_ids: per sample, token ids with expanded `<|image_pad|>` runs.
    config: model config.
    image_patches / image_grids: the images in order of appearance over the batch.
    padding_side: "left" (generation) or "right" (training).
    seq_len / max_patches / num_images: static bucket sizes (default: the batch maximum).

  Returns:
    dict of input_ids (B, L) int32, attention_mask (B, L) int32, position_ids (3, B, L) int32,
    rope_deltas (B,) int32 and, if there are images, pixel_values (N, P, D) float32 and
    image_grid_hw (N, 2) int32.
  """
  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
  longest = max(len(t) for t in token_ids)
  l = longest if seq_len is None else seq_len
  if longest > l:
    raise ValueError(f"a sample has {longest} tokens, more than seq_len={l}")
  b = len(token_ids)
  ids = np.full((b, l), pad_id, np.int32)
  mask = np.zeros((b, l), np.int32)
  for i, t in enumerate(token_ids):
    sl = slice(l - len(t), l) if padding_side == "left" else slice(0, len(t))
    ids[i, sl] = t
    mask[i, sl] = 1
  position_ids, deltas = get_rope_index(ids, mask, np.asarray(image_grids, np.int32).reshape(-1, 2),
                                        config.image_token_id, config.vision.spatial_merge_size)
  out = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, rope_deltas=deltas)
  if len(image_patches):
    out["pixel_values"], out["image_grid_hw"] = pad_images(image_patches, image_grids, config.vision.patch_dim,
                                                           max_patches, num_images)
  return out
