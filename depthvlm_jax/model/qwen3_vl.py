"""The full Qwen3-VL model: vision tower + text decoder + LM head, one pure forward.

Reference: HF `transformers` `Qwen3VLForConditionalGeneration`. Image features replace the
`<|image_pad|>` embeddings in row-major (batch, position) order, exactly like the reference's
`masked_scatter`; DeepStack features are added at the same positions after decoder layers
0, 1, 2. Both are done with one gather index computed from the token ids inside jit. With
`images_per_row` the index is built and applied per batch row (a gather with a batch dimension),
so a batch sharded over devices never gathers another device's activations.

Parameter tree (names mirror the HF state dict; see `hf_params.py`):
  visual/{patch_embed, pos_embed, blocks_i, merger, deepstack_merger_list_k}
  language_model/{embed_tokens, layers_i, norm}
  lm_head (absent when `tie_word_embeddings`)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.layers import AttentionMask, Dense
from depthvlm_jax.model.text import KVCache, TextDecoder
from depthvlm_jax.model.vision import VisionTower
from depthvlm_jax.sharding import constrain

Dtype = Any


class ImageFeatures(NamedTuple):
  """Per-image token features, laid out (num_images, max_tokens, D) in raster token order."""

  deepstack: list[jax.Array]  # merger outputs of the DeepStack vision layers
  llm_last: jax.Array  # LLM last hidden states (after the final norm) at the image tokens
  valid: jax.Array  # (num_images, max_tokens) bool


class Qwen3VLOutput(NamedTuple):
  logits: jax.Array | None  # (B, L, V)
  hidden_states: jax.Array  # (B, L, D) after the final norm
  image_features: ImageFeatures | None
  cache: list[KVCache] | None


def image_token_gather_index(input_ids, image_token_id: int, token_valid):
  """Pairs each row's `<|image_pad|>` positions with its image-feature slots, in order.

  The k-th image token of a row receives the k-th real feature slot of the same row (the row-major
  order of the reference's `masked_scatter`, restricted to one row). All index work stays inside a
  row, so a batch sharded over devices needs no exchange: give one row per batch row for that, or
  the whole batch flattened into one row (shape (1, B*L)) for images laid out across rows freely.

  Args:
    input_ids: (R, L) int.
    image_token_id: id of `<|image_pad|>`.
    token_valid: (R, F) bool real feature slots of each row (its images' token slots, in order).

  Returns:
    is_image: (R, L) bool; feature_of_position: (R, L) int index into the row's F feature slots;
    position_of_feature: (R, F) int index into the row's L positions (0 where invalid).
  """
  is_image = input_ids == image_token_id
  num_pos, num_feat = is_image.shape[1], token_valid.shape[1]
  pos_rank = jnp.cumsum(is_image, axis=1) - 1
  feat_rank = jnp.cumsum(token_valid, axis=1) - 1
  # a stable sort on "not selected" lists the selected slots first, in order: slot of the k-th one
  feature_of_rank = jnp.argsort(~token_valid, axis=1, stable=True).astype(jnp.int32)
  position_of_rank = jnp.argsort(~is_image, axis=1, stable=True).astype(jnp.int32)
  feature_of_position = jnp.take_along_axis(feature_of_rank, jnp.clip(pos_rank, 0, num_feat - 1), axis=1)
  position_of_feature = jnp.take_along_axis(position_of_rank, jnp.clip(feat_rank, 0, num_pos - 1), axis=1)
  return is_image, feature_of_position, jnp.where(token_valid, position_of_feature, 0)


def rows_of_images(x: jax.Array, rows: int) -> jax.Array:
  """(N, T, ...) per-image arrays -> (rows, N / rows * T, ...): the images of each row side by side."""
  n, t = x.shape[:2]
  return x.reshape((rows, n // rows * t) + x.shape[2:])


def attention_mask_for(attention_mask, cache_index=None) -> AttentionMask:
  """Causal + key-padding mask for queries at slots cache_index + i (`.dense(q_len)`: (B, 1, q_len, S))."""
  return AttentionMask(attention_mask.astype(bool), causal=True, q_offset=cache_index)


class Qwen3VL(nn.Module):
  config: Qwen3VLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # what a rematerialised block keeps (jax.checkpoint_policies)
  scan_layers: bool = False  # both towers' repeated blocks as lax.scan (one block in the program)
  # (text, vision) blocks of each scanned run applied after its loop: the compile report's probe of
  # one loop iteration's cost (`layers.run_blocks`); 0 otherwise
  scan_tail: tuple[int, int] = (0, 0)

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, remat_policy=self.remat_policy,
              scan_layers=self.scan_layers)
    self.visual = VisionTower(c.vision, scan_tail=self.scan_tail[1], **kw)
    self.language_model = TextDecoder(c.text, scan_tail=self.scan_tail[0], **kw)
    if not c.tie_word_embeddings:
      self.lm_head = Dense(c.text.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """LM head on (B, L, D) hidden states -> (B, L, V) logits."""
    if self.config.tie_word_embeddings:
      return self.language_model.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, input_ids, position_ids, attention_mask, pixel_values=None, image_grid_hw=None,
               cache: Sequence[KVCache] | None = None, cache_index=None, compute_logits: bool = True,
               return_image_features: bool = True, images_per_row: int | None = None) -> Qwen3VLOutput:
    """One forward pass.

    Args:
      input_ids: (B, L) int32, with `<|image_pad|>` placeholders (one per merged image token).
      position_ids: (3, B, L) int32 MRoPE positions (`rope_index.get_rope_index`).
      attention_mask: (B, L) 1 = real token (or (B, S) over all cache slots when `cache` is given).
      pixel_values: (N, P, C*T*P*P) padded patches, or None for a text-only batch.
      image_grid_hw: (N, 2) int patch grids, (0, 0) for padding images.
      cache: per-layer (k, v) caches of S slots, or None.
      cache_index: int32 scalar slot of input_ids[:, 0] in the cache.
      compute_logits: whether to apply the LM head (training may do it in chunks instead).
      return_image_features: also return per-image DeepStack/LLM features (for the depth head).
      images_per_row: static K: image slots b*K .. b*K+K-1 belong to row b (N = B*K; padding slots
        have grid (0, 0)). Each row then exchanges features with its own images only, which keeps a
        batch sharded over devices local. None: the images are matched to the image tokens in
        batch order across rows (any layout, e.g. prompts with different image counts).
    """
    b, l = input_ids.shape
    embeds = constrain(self.language_model.embed(input_ids), "batch", "length", "act_embed")
    deepstack_at_positions = []
    image_features = None
    if pixel_values is not None:
      merged, deepstack, token_valid = self.visual(pixel_values, image_grid_hw)
      n, t = token_valid.shape
      if images_per_row is not None and n != b * images_per_row:
        raise ValueError(f"images_per_row={images_per_row}: pixel_values has {n} images for {b} rows; "
                         f"expected {b * images_per_row}")
      rows = 1 if images_per_row is None else b
      is_image, feature_of_pos, pos_of_feature = image_token_gather_index(
          input_ids.reshape(rows, -1), self.config.image_token_id, rows_of_images(token_valid, rows))
      is_image = is_image.reshape(b, l, 1)
      d = embeds.shape[-1]

      def at_positions(feat):  # (N, T, D) -> (B, L, D), zeros where not an image token
        feat = rows_of_images(constrain(feat, "images", "image_tokens", "act_embed"), rows)
        placed = jnp.take_along_axis(feat, feature_of_pos[..., None], axis=1).reshape(b, l, d)
        return constrain(jnp.where(is_image, placed, 0).astype(embeds.dtype), "batch", "length", "act_embed")

      embeds = jnp.where(is_image, at_positions(merged), embeds)
      deepstack_at_positions = [at_positions(f) for f in deepstack]
    mask = attention_mask_for(attention_mask, cache_index)
    hidden, cache = self.language_model(embeds, position_ids, mask, deepstack_at_positions, cache, cache_index)
    hidden = constrain(hidden, "batch", "length", "act_embed")
    if pixel_values is not None and return_image_features:
      by_row = hidden.reshape(rows, -1, hidden.shape[-1])
      llm_last = jnp.take_along_axis(by_row, pos_of_feature[..., None], axis=1).reshape(n, t, -1)
      llm_last = jnp.where(token_valid[..., None], llm_last, 0)
      image_features = ImageFeatures(deepstack, constrain(llm_last, "images", "image_tokens", "act_embed"),
                                     token_valid)
    logits = self.logits(hidden) if compute_logits else None
    return Qwen3VLOutput(logits, hidden, image_features, cache)


def dummy_inputs(config: Qwen3VLConfig) -> dict[str, jax.Array]:
  """Smallest inputs that touch every parameter (one 2x2-patch image), for init / eval_shape."""
  v = config.vision
  unit = v.spatial_merge_size**2
  ids = jnp.array([[config.image_token_id, 0]], jnp.int32)
  return dict(input_ids=ids, position_ids=jnp.zeros((3, 1, 2), jnp.int32),
              attention_mask=jnp.ones((1, 2), jnp.int32),
              pixel_values=jnp.zeros((1, unit, v.patch_dim), jnp.float32),
              image_grid_hw=jnp.array([[v.spatial_merge_size, v.spatial_merge_size]], jnp.int32))


def init_params(model: Qwen3VL, rng: jax.Array):
  """Random parameters (boxed with logical axis names: use `nn.unbox` / `nn.get_partition_spec`)."""
  return model.init(rng, **dummy_inputs(model.config))["params"]
