"""Qwen3 text decoder with interleaved multimodal RoPE, DeepStack injection and a functional KV cache.

Reference: HF `transformers` `Qwen3VLTextModel` (modeling_qwen3_vl.py): RMSNorm, grouped-query
attention with per-head q/k RMSNorm, SwiGLU MLP, MRoPE over (t, h, w) position streams with the
frequency bands interleaved t,h,w,t,h,w,... (`mrope_section` bands for h and w).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from depthvlm_jax.model.config import TextConfig
from depthvlm_jax.model.layers import Dense, RMSNorm, apply_rotary, attention, checkpoint_policy, logical_init, run_blocks, weight_as
from depthvlm_jax.sharding import constrain

Dtype = Any
KVCache = tuple[jax.Array, jax.Array]  # each (batch, cache_len, kv_heads, head_dim)


def mrope_stream_of_frequency(head_dim: int, mrope_section: Sequence[int]) -> np.ndarray:
  """Which position stream (0=t, 1=h, 2=w) drives each of the head_dim/2 rotary frequencies.

  Interleaved layout: frequency i belongs to h if i % 3 == 1 and i < 3 * section_h, to w if
  i % 3 == 2 and i < 3 * section_w, otherwise to t.
  """
  stream = np.zeros(head_dim // 2, np.int32)
  for axis, offset in ((1, 1), (2, 2)):
    stream[offset:mrope_section[axis] * 3:3] = axis
  return stream


def mrope_cos_sin(position_ids: jax.Array, config: TextConfig):
  """Rotary angles for (3, B, L) MRoPE positions. Returns cos, sin: (B, L, head_dim) float32."""
  hd = config.head_dim
  inv_freq = 1.0 / (config.rope_theta**(jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  stream = mrope_stream_of_frequency(hd, config.mrope_section)
  pos = position_ids.astype(jnp.float32)[stream]  # (hd/2, B, L)
  freqs = jnp.moveaxis(pos, 0, -1) * inv_freq  # (B, L, hd/2)
  freqs = jnp.concatenate([freqs, freqs], -1)
  return jnp.cos(freqs), jnp.sin(freqs)


class TextAttention(nn.Module):
  """GQA self-attention with q/k RMSNorm and rotary; optionally reads/writes a KV cache."""

  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache: KVCache | None = None, cache_index=None):
    """x: (B, L, D); mask: `AttentionMask` over S keys (cache slots); returns (out (B, L, D), new cache)."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, l, _ = x.shape
    q = Dense(c.num_attention_heads * c.head_dim, ("embed", "q_heads"), c.attention_bias, name="q_proj", **kw)(x)
    k = Dense(c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), c.attention_bias, name="k_proj", **kw)(x)
    v = Dense(c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), c.attention_bias, name="v_proj", **kw)(x)
    q = RMSNorm(c.rms_norm_eps, "head_dim", name="q_norm", **kw)(q.reshape(b, l, c.num_attention_heads, c.head_dim))
    k = RMSNorm(c.rms_norm_eps, "head_dim", name="k_norm", **kw)(k.reshape(b, l, c.num_key_value_heads, c.head_dim))
    v = v.reshape(b, l, c.num_key_value_heads, c.head_dim)
    q = constrain(apply_rotary(q, cos, sin), "batch", "length", "act_heads", None)
    k = constrain(apply_rotary(k, cos, sin), "batch", "length", "act_kv_heads", None)
    v = constrain(v, "batch", "length", "act_kv_heads", None)
    if cache is not None:
      k_cache, v_cache = cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
      cache = (k, v)
      k, v = k.astype(self.dtype), v.astype(self.dtype)
    out = attention(q, k, v, mask, c.attention_impl).reshape(b, l, -1)
    out = Dense(c.hidden_size, ("q_heads", "embed"), c.attention_bias, name="o_proj", **kw)(out)
    return out, cache


class TextMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Dense(c.intermediate_size, ("embed", "mlp"), False, name="gate_proj", **kw)(x)
    up = Dense(c.intermediate_size, ("embed", "mlp"), False, name="up_proj", **kw)(x)
    h = constrain(jax.nn.silu(gate) * up, "batch", "length", "act_mlp")
    return Dense(c.hidden_size, ("mlp", "embed"), False, name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = constrain(x, "batch", "length", "act_embed")
    h = RMSNorm(c.rms_norm_eps, "embed", name="input_layernorm", **kw)(x)
    h, cache = TextAttention(c, name="self_attn", **kw)(h, cos, sin, mask, cache, cache_index)
    x = x + h
    h = RMSNorm(c.rms_norm_eps, "embed", name="post_attention_layernorm", **kw)(x)
    return constrain(x + TextMLP(c, name="mlp", **kw)(h), "batch", "length", "act_embed"), cache


class TextDecoder(nn.Module):
  """Token embedding, decoder layers (with DeepStack additions after the first layers), final norm."""

  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (with remat)
  scan_layers: bool = False  # run the layers after the DeepStack ones as one lax.scan (see `run_blocks`)
  scan_tail: int = 0  # layers of the scanned run applied after its loop (compile-report probe; see `run_blocks`)

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = self.param("embed_tokens", logical_init(nn.initializers.normal(0.02), ("vocab", "embed")),
                                   (c.vocab_size, c.hidden_size), self.param_dtype)
    layer_cls = (nn.remat(DecoderLayer, static_argnums=(), policy=checkpoint_policy(self.remat_policy))
                 if self.remat else DecoderLayer)
    self.layers = [layer_cls(c, name=f"layers_{i}", **kw) for i in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, "embed", **kw)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(B, L) int -> (B, L, D)."""
    return jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)

  def attend(self, hidden: jax.Array) -> jax.Array:
    """Tied LM head: (B, L, D) @ embed_tokens.T -> (B, L, V)."""
    return jnp.einsum("bld,vd->blv", hidden, weight_as(hidden, self.embed_tokens, self.dtype))

  def __call__(self, embeds, position_ids, mask, deepstack_at_positions: Sequence[jax.Array] = (),
               cache: Sequence[KVCache] | None = None, cache_index=None):
    """Runs the decoder.

    Args:
      embeds: (B, L, D) input embeddings (image features already placed).
      position_ids: (3, B, L) MRoPE positions.
      mask: `AttentionMask`, causal, over S keys (S = L without cache, cache length with cache).
      deepstack_at_positions: per DeepStack level, (B, L, D) features to add after decoder layer
        i (zeros at non-image positions).
      cache: per layer (k, v) caches, or None.
      cache_index: int32 scalar slot where this call's tokens are written.

    Returns:
      hidden (B, L, D) after the final norm, and the updated cache (or None).
    """
    cos, sin = mrope_cos_sin(position_ids, self.config)
    x = embeds
    if cache is not None:  # prefill / decode: one call per layer, each with its own cache
      new_cache = []
      for i, layer in enumerate(self.layers):
        x, layer_cache = layer(x, cos, sin, mask, cache[i], cache_index)
        new_cache.append(layer_cache)
        if i < len(deepstack_at_positions):
          x = x + deepstack_at_positions[i].astype(x.dtype)
      return self.norm(x), new_cache
    for i, feat in enumerate(deepstack_at_positions):  # the layers followed by a DeepStack addition
      x = self.layers[i](x, cos, sin, mask)[0] + feat.astype(x.dtype)
    template = DecoderLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype, parent=None)
    x = run_blocks(self, self.layers[len(deepstack_at_positions):], template,
                   lambda layer, h: layer(h, cos, sin, mask)[0], x, scan=self.scan_layers, remat=self.remat,
                   remat_policy=self.remat_policy, tail=self.scan_tail)
    return self.norm(x), None
