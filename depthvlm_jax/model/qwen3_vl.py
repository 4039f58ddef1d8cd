"""The full Qwen3-VL model: vision tower + text decoder + LM head, one pure forward.

Reference: HF `transformers` `Qwen3VLForConditionalGeneration`. Image features replace the
`<|image_pad|>` embeddings in row-major (batch, position) order, exactly like the reference's
`masked_scatter`; DeepStack features are added at the same positions after decoder layers
0, 1, 2. Both are done with one gather index computed from the token ids inside jit.

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
  """Maps sequence positions to image-feature rows and back, as `masked_scatter` orders them.

  Args:
    input_ids: (B, L) int.
    image_token_id: id of `<|image_pad|>`.
    token_valid: (N, T) bool real image tokens (features flattened to N*T rows).

  Returns:
    is_image: (B*L,) bool; feature_row_of_position: (B*L,) int index into the N*T feature rows;
    position_of_feature: (N*T,) int index into the B*L positions (0 where invalid).
  """
  is_image = (input_ids == image_token_id).reshape(-1)
  num_pos = is_image.shape[0]
  valid = token_valid.reshape(-1)
  num_feat = valid.shape[0]
  pos_rank = jnp.cumsum(is_image) - 1
  feat_rank = jnp.cumsum(valid) - 1
  feature_of_rank = jnp.zeros((num_feat,), jnp.int32).at[jnp.where(valid, feat_rank, num_feat)].set(
      jnp.arange(num_feat, dtype=jnp.int32), mode="drop")
  position_of_rank = jnp.zeros((num_pos,), jnp.int32).at[jnp.where(is_image, pos_rank, num_pos)].set(
      jnp.arange(num_pos, dtype=jnp.int32), mode="drop")
  feature_row_of_position = feature_of_rank[jnp.clip(pos_rank, 0, num_feat - 1)]
  position_of_feature = jnp.where(valid, position_of_rank[jnp.clip(feat_rank, 0, num_pos - 1)], 0)
  return is_image, feature_row_of_position, position_of_feature


def attention_mask_for(attention_mask, cache_index=None) -> AttentionMask:
  """Causal + key-padding mask for queries at slots cache_index + i (`.dense(q_len)`: (B, 1, q_len, S))."""
  return AttentionMask(attention_mask.astype(bool), causal=True, q_offset=cache_index)


class Qwen3VL(nn.Module):
  config: Qwen3VLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
    self.visual = VisionTower(c.vision, **kw)
    self.language_model = TextDecoder(c.text, **kw)
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
               return_image_features: bool = True) -> Qwen3VLOutput:
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
    """
    b, l = input_ids.shape
    embeds = self.language_model.embed(input_ids)
    deepstack_at_positions = []
    image_features = None
    if pixel_values is not None:
      merged, deepstack, token_valid = self.visual(pixel_values, image_grid_hw)
      is_image, row_of_pos, pos_of_row = image_token_gather_index(input_ids, self.config.image_token_id,
                                                                  token_valid)
      d = embeds.shape[-1]

      def at_positions(feat):  # (N, T, D) -> (B, L, D), zeros where not an image token
        rows = feat.reshape(-1, d)[row_of_pos]
        return jnp.where(is_image[:, None], rows, 0).reshape(b, l, d).astype(embeds.dtype)

      embeds = jnp.where(is_image.reshape(b, l, 1), at_positions(merged), embeds)
      deepstack_at_positions = [at_positions(f) for f in deepstack]
    mask = attention_mask_for(attention_mask, cache_index)
    hidden, cache = self.language_model(embeds, position_ids, mask, deepstack_at_positions, cache, cache_index)
    if pixel_values is not None and return_image_features:
      n, t = token_valid.shape
      llm_last = hidden.reshape(b * l, -1)[pos_of_row].reshape(n, t, -1)
      llm_last = jnp.where(token_valid[..., None], llm_last, 0)
      image_features = ImageFeatures(deepstack, llm_last, token_valid)
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
