"""LoRA adapters through qwix: where they go, that merging them into the kernels gives the adapted
model's outputs (unrolled and scanned layers), and that fresh adapters change nothing."""

import dataclasses

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from depthvlm_jax.model import lora
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, depthvlm_dummy_inputs, random_params
from depthvlm_jax.model.inputs import make_model_inputs
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.runs.freeze import merge_params
from tests.model import hf_reference as ref

RANK, ALPHA = 4, 8.0
PROJECTIONS = {"self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
               "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"}


def _config():
  """Six text layers: with scan_layers the three after the DeepStack ones run as one lax.scan. (The
  full vocabulary: the prompts hold real Qwen token ids.)"""
  tiny = Qwen3VLConfig.tiny()
  return dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, num_hidden_layers=6))


def _batch(config):
  rng = np.random.default_rng(5)
  grids = [(4, 6), (4, 6)]
  batch = make_model_inputs([ref.build_prompt(rng, config, grids[:1]), ref.build_prompt(rng, config, grids[1:])],
                            config, [ref.random_image_patches(rng, g, config) for g in grids], grids)
  batch.pop("rope_deltas")
  assert batch["input_ids"].max() < config.text.vocab_size
  return batch


def test_adapters_on_the_llm_projections_only():
  config = _config()
  shapes = abstract_params(lora.with_lora(DepthVLM(config, head=DepthHeadConfig.tiny("mlp")), RANK, ALPHA),
                           **depthvlm_dummy_inputs(config))
  flat = flatten_dict(shapes)
  adapted = lora.adapter_modules(shapes)
  assert set(adapted) == {f"language_model/layers_{i}/{p}" for i in range(6) for p in PROJECTIONS}
  for m in adapted:
    path = tuple(m.split("/"))
    d_in, d_out = flat[path + ("kernel",)].shape
    assert flat[path + ("kernel_lora_a",)].shape == (d_in, RANK)
    assert flat[path + ("kernel_lora_b",)].shape == (RANK, d_out)
  # everything else is the plain model's tree
  plain = flatten_dict(abstract_params(DepthVLM(config, head=DepthHeadConfig.tiny("mlp")),
                                       **depthvlm_dummy_inputs(config)))
  assert {k: v for k, v in flat.items() if not lora.is_adapter(k)} == plain


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_merged_forward_equals_adapted_forward(scan):
  """Random adapters (B nonzero): the adapted model's logits and depth equal the plain model's on the
  merged kernels within 1e-5, and differ clearly from the plain model on the unmerged kernels."""
  config = _config()
  head = DepthHeadConfig.tiny("mlp")
  adapted = lora.with_lora(DepthVLM(config, head=head, scan_layers=scan), RANK, ALPHA)
  plain = DepthVLM(config, head=head, scan_layers=scan)
  params = random_params(adapted, seed=1)
  base, adapters = lora.split_adapters(params)
  assert adapters and all(np.abs(x).max() > 0 for x in jax.tree.leaves(adapters))
  batch = _batch(config)
  run = jax.jit(lambda p, m: m.apply({"params": p}, **batch, depth_grid=(2, 3)), static_argnums=1)
  got, want, without = run(params, adapted), run(lora.merge_adapters(params, RANK, ALPHA), plain), run(base, plain)
  assert np.isfinite(np.asarray(got.logits)).all() and np.isfinite(np.asarray(got.depth)).all()
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got.depth), np.asarray(want.depth), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got.logits) - np.asarray(without.logits)).max() > 1e-2  # the adapters do act


@pytest.mark.slow
def test_scanned_adapted_model_equals_unrolled_with_gradients():
  """The scanned loop body applies the adapters of each layer (it sees the first looped layer's path)."""
  config = _config()
  head = DepthHeadConfig.tiny("mlp")
  params = random_params(lora.with_lora(DepthVLM(config, head=head), RANK, ALPHA), seed=2)
  batch = _batch(config)

  def loss(p, m):
    out = m.apply({"params": p}, **batch, depth_grid=(2, 3))
    return out.logits.std() + out.depth.mean()

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  results = [grad(params, lora.with_lora(DepthVLM(config, head=head, scan_layers=s), RANK, ALPHA)) for s in (False, True)]
  (l0, g0), (l1, g1) = results
  assert np.isfinite(float(l0))
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  f0, f1 = flatten_dict(g0), flatten_dict(g1)
  for k in f0:
    if lora.is_adapter(k):
      assert np.abs(np.asarray(f0[k])).max() > 0, k  # every adapter gets a gradient
    np.testing.assert_allclose(np.asarray(f1[k]), np.asarray(f0[k]), rtol=1e-4, atol=1e-7, err_msg=str(k))


@pytest.mark.slow
def test_fresh_adapters_leave_the_model_unchanged():
  """`init_adapters` (A He-uniform, B zero, as qwix initialises them) on loaded weights: the adapted
  forward equals the plain one exactly."""
  config = _config()
  head = DepthHeadConfig.tiny("mlp")
  adapted = lora.with_lora(DepthVLM(config, head=head), RANK, ALPHA)
  plain = DepthVLM(config, head=head)
  base = random_params(plain, seed=4)
  _, like = lora.split_adapters(abstract_params(adapted, **depthvlm_dummy_inputs(config)))
  fresh = lora.init_adapters(like, jax.random.key(0))
  flat = flatten_dict(fresh)
  assert all(np.abs(np.asarray(v)).max() > 0 for k, v in flat.items() if k[-1] == "kernel_lora_a")
  assert all(not np.asarray(v).any() for k, v in flat.items() if k[-1] == "kernel_lora_b")
  batch = _batch(config)
  run = jax.jit(lambda p, m: m.apply({"params": p}, **batch, depth_grid=(2, 3)), static_argnums=1)
  got, want = run(merge_params(fresh, base), adapted), run(base, plain)
  assert np.isfinite(np.asarray(want.logits)).all()
  np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(want.logits))
  np.testing.assert_array_equal(np.asarray(got.depth), np.asarray(want.depth))
