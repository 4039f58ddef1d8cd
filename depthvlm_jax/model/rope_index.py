"""Host-side (NumPy) MRoPE position ids, equivalent to HF `Qwen3VLModel.get_rope_index` for images.

Text tokens advance all three streams together; an image's tokens get t = start,
h = start + row, w = start + col over its (grid_h/merge, grid_w/merge) token grid, and the text after
it resumes at start + max(llm_h, llm_w). Padding positions (attention_mask == 0) get 0, and each row
gets a `delta` = max position + 1 - number of real tokens, used to position generated tokens.
Computed in the input pipeline, never inside jit (STYLE.md: static shapes, host positions).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def get_rope_index(input_ids: np.ndarray, attention_mask: np.ndarray | None,
                   image_grid_hw: Sequence[Sequence[int]] | np.ndarray, image_token_id: int,
                   spatial_merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """MRoPE positions for a batch.

  Args:
    input_ids: (B, L) token ids with `<|image_pad|>` placeholders.
    attention_mask: (B, L), 1 = real token; None = all real.
    image_grid_hw: patch grids (h, w) of the images in order of appearance (row-major over the
      batch); padding images with grid (0, 0) are ignored.
    image_token_id: the placeholder id.
    spatial_merge_size: vision merge size (2).

  Returns:
    position_ids (3, B, L) int32 and deltas (B,) int32.

  Raises:
    ValueError: when placeholder counts do not match the image grids.
  """
  input_ids = np.asarray(input_ids)
  b, l = input_ids.shape
  mask = np.ones((b, l), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  grids = [tuple(int(v) for v in g) for g in np.asarray(image_grid_hw).reshape(-1, 2) if g[0] and g[1]]
  positions = np.zeros((3, b, l), np.int32)
  deltas = np.zeros((b,), np.int32)
  next_image = 0
  for row in range(b):
    idx = np.nonzero(mask[row])[0]
    ids = input_ids[row, idx]
    out = np.zeros((3, len(ids)), np.int64)
    pos, i = 0, 0
    while i < len(ids):
      if ids[i] != image_token_id:
        j = i
        while j < len(ids) and ids[j] != image_token_id:
          j += 1
        out[:, i:j] = pos + np.arange(j - i)
        pos += j - i
        i = j
        continue
      if next_image >= len(grids):
        raise ValueError(f"row {row}: more <|image_pad|> runs than images ({len(grids)} given)")
      gh, gw = grids[next_image][0] // spatial_merge_size, grids[next_image][1] // spatial_merge_size
      n = gh * gw
      if i + n > len(ids) or np.any(ids[i:i + n] != image_token_id):
        raise ValueError(f"row {row}: image {next_image} with token grid {gh}x{gw} needs {n} consecutive "
                         f"<|image_pad|> tokens at position {idx[i]}")
      hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
      out[0, i:i + n] = pos
      out[1, i:i + n] = pos + hh.reshape(-1)
      out[2, i:i + n] = pos + ww.reshape(-1)
      pos += max(gh, gw)
      i += n
      next_image += 1
    positions[:, row, idx] = out
    deltas[row] = (out.max() + 1 - len(ids)) if len(ids) else 0
  if next_image != len(grids):
    raise ValueError(f"{len(grids)} images given but only {next_image} placeholder runs found")
  return positions, deltas


def text_position_ids(attention_mask: np.ndarray) -> np.ndarray:
  """Positions for a text-only batch: (3, B, L), counting real tokens only (0 at padding)."""
  m = np.asarray(attention_mask).astype(np.int64)
  pos = np.clip(np.cumsum(m, axis=1) - 1, 0, None) * m
  return np.broadcast_to(pos[None], (3,) + m.shape).astype(np.int32).copy()
