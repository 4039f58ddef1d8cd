"""The attention kernels against the XLA form (`layers._attention_xla`), on the CPU.

The Pallas TPU splash kernel runs in interpret mode; `jax.nn.dot_product_attention` runs the call
`layers.cudnn_attention` makes through its XLA implementation (same masks, sequence lengths and
causal flag as the cuDNN call). Outputs are compared at real query rows (the rows the model reads);
gradients of a loss over those rows everywhere.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthvlm_jax import sharding
from depthvlm_jax.model import cpu_kernels, layers
from depthvlm_jax.model.config import ConfigError, Qwen3VLConfig
from depthvlm_jax.model.qwen3_vl import Qwen3VL, init_params
from depthvlm_jax.model.inputs import make_model_inputs
from depthvlm_jax.model.layers import AttentionMask

TOL = 2e-5  # float32; measured differences are below 7e-6


def _inputs(seed, b, l, heads, kv_heads, d, lengths, causal, prefix=False):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, l, heads, d)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, l, kv_heads, d)), jnp.float32) for _ in range(2))
  valid = jnp.arange(l)[None] < jnp.asarray(lengths)[:, None]
  return q, k, v, AttentionMask(valid, causal=causal, kv_prefix=prefix)


def _masked_loss(fn, mask):
  """A loss over the real query rows only, with weights that differ per head dim."""
  w = mask.kv_valid[:, :, None, None] * jnp.cos(jnp.arange(16.0))
  return lambda q, k, v: jnp.sum(fn(q, k, v) * w)


def _max_diff_at_real_rows(a, b, mask):
  return float(jnp.max(jnp.abs(jnp.where(mask.kv_valid[:, :, None, None], a - b, 0))))


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_splash_interpret_matches_xla_form(causal):
  # 200 slots pad to 256 = two kernel blocks (causal blocks above the diagonal are skipped); grouped
  # heads 4 / 2; the second row has 50 padding slots.
  q, k, v, mask = _inputs(0, 2, 200, 4, 2, 16, [200, 150], causal)
  xla = lambda q, k, v: layers._attention_xla(q, k, v, mask.dense(200))
  splash = lambda q, k, v: layers.splash_attention(q, k, v, mask, interpret=True)
  assert _max_diff_at_real_rows(xla(q, k, v), splash(q, k, v), mask) < TOL
  if causal:  # the gradient pass runs both backward kernels (dq, dkv)
    want = jax.grad(_masked_loss(xla, mask), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(_masked_loss(splash, mask), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", want, got):
      assert float(jnp.max(jnp.abs(a - b))) < TOL * 5, name


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("prefix", [True, False], ids=["seq_lengths", "mask"])
def test_dot_product_attention_call_matches_xla_form(causal, prefix):
  q, k, v, mask = _inputs(1, 3, 24, 4, 2, 16, [24, 17, 0], causal, prefix)  # row 3: a padding image
  want = layers._attention_xla(q, k, v, mask.dense(24))
  dpa = lambda q, k, v: layers.cudnn_attention(q, k, v, mask, implementation="xla")
  got = dpa(q, k, v)
  assert bool(jnp.all(jnp.isfinite(got)))  # no empty row, even for the row without real keys
  assert _max_diff_at_real_rows(want, got, mask) < TOL
  xla = lambda q, k, v: layers._attention_xla(q, k, v, mask.dense(24))
  for a, b in zip(jax.grad(_masked_loss(xla, mask), argnums=(0, 1, 2))(q, k, v),
                  jax.grad(_masked_loss(dpa, mask), argnums=(0, 1, 2))(q, k, v)):
    assert float(jnp.max(jnp.abs(a - b))) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("mask_kind", ["causal", "padding", "none"])
def test_query_chunks_equal_the_whole_xla_form(mask_kind):
  """On XLA:CPU, past `max_logits_bytes` the XLA form runs over query chunks (300 queries in chunks
  of 128, the last padded): the same outputs and gradients as one call."""
  q, k, v, mask = _inputs(2, 2, 300, 4, 2, 16, [300, 211], mask_kind == "causal")
  dense = {"causal": mask.dense(300), "padding": mask.kv_valid[:, None, None, :], "none": None}[mask_kind]
  whole = lambda q, k, v: layers._attention_xla(q, k, v, dense)
  bound = 2 * 4 * 300 * 4 * 128  # one 128-query chunk of logits: (batch 2, heads 4, 128, 300) float32
  chunked = lambda q, k, v: cpu_kernels.attention_in_query_chunks(layers._attention_xla, q, k, v, dense, bound)
  assert "scan[" in str(jax.make_jaxpr(chunked)(q, k, v))  # it does run in chunks (lax.map)
  np.testing.assert_allclose(np.asarray(chunked(q, k, v)), np.asarray(whole(q, k, v)), atol=1e-6)
  for a, b in zip(jax.grad(_masked_loss(whole, mask), argnums=(0, 1, 2))(q, k, v),
                  jax.grad(_masked_loss(chunked, mask), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)  # float32 summation order


def test_dense_mask_is_the_models_former_mask():
  """`AttentionMask.dense` is the (B, 1, Lq, S) causal + key-padding mask, KV-cache offset included."""
  valid = jnp.asarray([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
  dense = AttentionMask(valid, causal=True, q_offset=jnp.int32(3)).dense(2)
  slot = np.arange(6)
  want = (slot[None, :] <= 3 + np.arange(2)[:, None])[None, None] & np.asarray(valid)[:, None, None, :]
  np.testing.assert_array_equal(np.asarray(dense), want)
  np.testing.assert_array_equal(np.asarray(AttentionMask(valid).dense(4)), np.asarray(valid)[:, None, None, :])


def test_attention_picks_the_kernel_of_the_compile_target(monkeypatch):
  calls = []
  monkeypatch.setattr(layers, "splash_attention", lambda *a: calls.append("splash") or a[0])
  monkeypatch.setattr(layers, "cudnn_attention", lambda *a: calls.append("cudnn") or a[0])
  q, k, v, mask = _inputs(2, 1, 8, 2, 1, 16, [8], causal=True)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  layers.attention(q, k, v, mask)  # auto on the CPU: the XLA form
  assert calls == []
  monkeypatch.setattr(layers, "compile_target", lambda: "tpu")
  in_mesh = lambda fn: sharding.in_mesh(fn, sharding.make_mesh({"data": -1}))()
  in_mesh(lambda: layers.attention(q, k, v, mask))
  in_mesh(lambda: layers.attention(q, k, v, mask.replace(q_offset=jnp.int32(0))))  # a KV cache: XLA form
  in_mesh(lambda: layers.attention(q, k, v, mask.dense(8)))  # a plain boolean mask: XLA form
  layers.attention(q, k, v, mask)  # 8 devices and no mesh to lay the kernel out on: XLA form
  assert calls == ["splash"]
  monkeypatch.setattr(layers, "compile_target", lambda: "gpu")
  layers.attention(*bf, mask)
  layers.attention(q, k, v, mask)  # float32: cuDNN's kernel takes fp16/bf16 only
  assert calls == ["splash", "cudnn"]


def test_compile_target_is_the_mesh_platform():
  assert sharding.compile_target() == jax.default_backend() == "cpu"
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  assert sharding.in_mesh(sharding.compile_target, mesh)() == "cpu"
  assert layers.resolve_attention_impl("auto", "tpu") == "splash"
  assert layers.resolve_attention_impl("auto", "cuda") == "cudnn"
  assert layers.resolve_attention_impl("auto", "cpu") == "xla"
  with pytest.raises(ValueError, match="attention_impl='splash' compiles for tpu only, the target is cpu"):
    layers.resolve_attention_impl("splash", "cpu")


def test_attention_impl_is_a_run_setting_not_part_of_config_json():
  config = Qwen3VLConfig.tiny().with_attention_impl("splash")
  assert config.vision.attention_impl == config.text.attention_impl == "splash"
  d = config.to_hf_dict()
  assert "attention_impl" not in d["vision_config"] and "attention_impl" not in d["text_config"]
  assert Qwen3VLConfig.from_hf_dict(d) == Qwen3VLConfig.tiny()
  with pytest.raises(ConfigError, match="text_config.attention_impl='flash' not one of"):
    dataclasses.replace(Qwen3VLConfig.tiny(), text=dataclasses.replace(Qwen3VLConfig.tiny().text,
                                                                       attention_impl="flash"))


@pytest.mark.slow
def test_model_with_the_splash_kernel_matches_the_xla_form(monkeypatch):
  """A Qwen3-VL forward with every attention through the splash kernel (interpret mode): the
  vision tower's per-image padding (images of 48 and 16 patches, a padding image slot) and the
  decoder's causal + right padding reach the kernel as the model means them. Two layers per tower."""
  tiny = Qwen3VLConfig.tiny(vocab_size=152000, deepstack=(0,))
  config = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, depth=2),
                               text=dataclasses.replace(tiny.text, num_hidden_layers=2))
  model = Qwen3VL(config)
  params = nn.unbox(init_params(model, jax.random.key(3)))
  rng = np.random.default_rng(0)
  grids = [(6, 8), (4, 4)]

  def prompt(grid, n_text):  # text, vision_start, one image_pad per merged token, vision_end, text
    image = [config.vision_start_token_id] + [config.image_token_id] * (grid[0] * grid[1] // 4) + [
        config.vision_end_token_id]
    return list(rng.integers(100, 5000, n_text)) + image + list(rng.integers(100, 5000, 3))

  toks = [prompt(grids[0], 5), prompt(grids[1], 9)]
  patches = [rng.standard_normal((h * w, config.vision.patch_dim)).astype(np.float32) for h, w in grids]
  batch = make_model_inputs(toks, config, patches, grids, padding_side="right", num_images=3)
  batch.pop("rope_deltas")
  run = lambda: model.apply({"params": params}, **batch, compute_logits=False)
  want = jax.jit(run)()
  monkeypatch.setattr(layers, "compile_target", lambda: "tpu")
  monkeypatch.setattr(layers, "splash_attention", functools.partial(layers.splash_attention, interpret=True))
  # As on one chip: interpret mode does not run under shard_map on the CPU (the per-shard layout is
  # compiled for TPU chips by tests/test_aot.py).
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  got = jax.jit(run)()
  real = batch["attention_mask"].astype(bool)
  assert real.sum() < real.size  # right padding in the batch
  np.testing.assert_allclose(np.asarray(got.hidden_states)[real], np.asarray(want.hidden_states)[real],
                             rtol=1e-4, atol=1e-4)
  for a, b in zip(got.image_features.deepstack, want.image_features.deepstack):  # vision tower outputs
    valid = np.asarray(want.image_features.valid)
    np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], rtol=1e-4, atol=1e-4)


def test_gpu_target_without_cudnn_on_the_host_falls_back_to_the_xla_form(monkeypatch, caplog):
  """cuDNN's call checks for the library while tracing; this CPU host has none."""
  monkeypatch.setattr(layers, "compile_target", lambda: "gpu")
  q, k, v, mask = (x.astype(jnp.bfloat16) if hasattr(x, "astype") else x
                   for x in _inputs(3, 1, 8, 2, 1, 16, [8], causal=True))
  got = layers.attention(q, k, v, mask)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(layers._attention_xla(q, k, v, mask.dense(8)), np.float32))
  assert "cuDNN attention unavailable" in caplog.text
