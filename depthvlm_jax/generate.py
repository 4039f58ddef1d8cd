"""Jitted text generation with a static-shape KV cache (greedy or sampled).

One prefill over the left-padded prompt (images included) fills a cache of
`prompt_len + max_new_tokens` slots; then `lax.scan` decodes one token per step. A generated token
at step t sits at MRoPE position (max prompt position + 1 + t) on all three streams, as in HF
`Qwen3VLForConditionalGeneration.generate`. The prefill output is returned too, so DepthVLM gets its
depth map and its text answer from the same prefill.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from depthvlm_jax.model.qwen3_vl import Qwen3VL


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; otherwise sample after top-k / top-p filtering."""

  max_new_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_token_ids: tuple[int, ...] = (151645, 151643)  # <|im_end|>, <|endoftext|>
  pad_token_id: int = 151643


def _select(logits: jax.Array, rng: jax.Array, s: SamplingConfig) -> jax.Array:
  """(B, V) float32 logits -> (B,) int32 tokens."""
  if s.temperature <= 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / s.temperature
  if s.top_k > 0:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    sorted_logits = jnp.sort(logits, -1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    cutoff_idx = jnp.sum(cum < s.top_p, -1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, -1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


def init_cache(model: Qwen3VL, batch: int, slots: int, dtype=None) -> list[tuple[jax.Array, jax.Array]]:
  t = model.config.text
  shape = (batch, slots, t.num_key_value_heads, t.head_dim)
  dtype = dtype or model.dtype
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(t.num_hidden_layers)]


def prefill(model: Qwen3VL, params: Any, input_ids, attention_mask, position_ids, pixel_values=None,
            image_grid_hw=None, *, max_new_tokens: int, depth_grid: tuple[int, int] | None = None,
            depth_output_size: tuple[int, int] | None = None, images_per_row: int | None = None):
  """The prompt pass that seeds the KV cache (and, for a `DepthVLM` with `depth_grid`, gives depth).

  Args: as `generate_tokens`; the cache gets `L + max_new_tokens` slots. images_per_row: see
    `Qwen3VL.__call__` (1 for one image per prompt: the placement then stays within each row).

  Returns:
    (prefill output with its `cache`, key_valid (B, L + max_new_tokens), last-position logits (B, V)).
  """
  b, l = input_ids.shape
  cache = init_cache(model, b, l + max_new_tokens)
  key_valid = jnp.concatenate([attention_mask, jnp.ones((b, max_new_tokens), attention_mask.dtype)], 1)
  variables = {"params": params}
  depth_kw = {} if depth_grid is None else dict(depth_grid=depth_grid, depth_output_size=depth_output_size)
  out = model.apply(variables, input_ids, position_ids, key_valid, pixel_values, image_grid_hw,
                    cache=cache, cache_index=0, compute_logits=False, images_per_row=images_per_row, **depth_kw)
  last_logits = model.apply(variables, out.hidden_states[:, -1:], method="logits")[:, 0]
  return out, key_valid, last_logits


def decode_step(model: Qwen3VL, params: Any, token, position_ids, key_valid, cache, cache_index):
  """One generated token through the decoder: token (B,), position_ids (3, B, 1) -> output (logits, cache)."""
  return model.apply({"params": params}, token[:, None], position_ids, key_valid, cache=cache,
                     cache_index=cache_index)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "depth_grid", "depth_output_size",
                                             "images_per_row"))
def generate_tokens(model: Qwen3VL, params: Any, input_ids, attention_mask, position_ids, rng,
                    pixel_values=None, image_grid_hw=None, *, sampling: SamplingConfig,
                    depth_grid: tuple[int, int] | None = None, depth_output_size: tuple[int, int] | None = None,
                    images_per_row: int | None = None):
  """Generates `sampling.max_new_tokens` tokens after a left-padded prompt.

  Args:
    model: the Flax module (static).
    params: its parameters.
    input_ids, attention_mask: (B, L) left-padded prompt.
    position_ids: (3, B, L) MRoPE positions of the prompt.
    rng: PRNG key (unused for greedy).
    pixel_values, image_grid_hw: padded images or None.
    depth_grid, depth_output_size: for a `DepthVLM`, the static depth bucket (see
      `DepthVLM.__call__`): the prefill then also runs the depth head, so the returned prefill output
      carries `depth` (N, H, W) computed from the same pass that seeded the KV cache.
    images_per_row: static; see `Qwen3VL.__call__` (None: any layout of images over the prompts).

  Returns:
    tokens (B, max_new_tokens) int32 (`pad_token_id` after a row's EOS) and the prefill output
    (`Qwen3VLOutput` or `DepthVLMOutput`; logits not computed, cache dropped).
  """
  b, l = input_ids.shape
  n_new = sampling.max_new_tokens
  first_out, key_valid, last_logits = prefill(model, params, input_ids, attention_mask, position_ids, pixel_values,
                                              image_grid_hw, max_new_tokens=n_new, depth_grid=depth_grid,
                                              depth_output_size=depth_output_size, images_per_row=images_per_row)
  next_pos = jnp.max(position_ids, axis=(0, 2)) + 1  # (B,)
  eos = jnp.asarray(sampling.eos_token_ids, jnp.int32)
  rng, sub = jax.random.split(rng)
  first = _select(last_logits.astype(jnp.float32), sub, sampling)

  def step(carry, t):
    token, done, cache, rng = carry
    pos = jnp.broadcast_to((next_pos + t)[None, :, None], (3, b, 1)).astype(jnp.int32)
    out = decode_step(model, params, token, pos, key_valid, cache, l + t)
    rng, sub = jax.random.split(rng)
    nxt = _select(out.logits[:, -1].astype(jnp.float32), sub, sampling)
    done = done | jnp.isin(token, eos)
    nxt = jnp.where(done, sampling.pad_token_id, nxt)
    return (nxt, done, out.cache, rng), token

  done0 = jnp.zeros((b,), bool)
  (last, _, _, _), tokens = jax.lax.scan(step, (first, done0, first_out.cache, rng), jnp.arange(n_new - 1))
  tokens = jnp.concatenate([tokens.T, last[:, None]], 1) if n_new > 1 else first[:, None]
  return tokens, first_out._replace(cache=None)


def check_left_padded(attention_mask: np.ndarray) -> None:
  """Generation needs every row's prompt to end at the last column."""
  if not np.all(np.asarray(attention_mask)[:, -1]):
    raise ValueError("generation needs left-padded prompts (attention_mask[:, -1] must be 1 for every row)")


def strip_after_eos(tokens: np.ndarray, eos_token_ids: Sequence[int]) -> list[list[int]]:
  """Per row, the generated ids up to (excluding) the first EOS."""
  out = []
  for row in np.asarray(tokens).tolist():
    cut = next((i for i, t in enumerate(row) if t in eos_token_ids), len(row))
    out.append(row[:cut])
  return out
