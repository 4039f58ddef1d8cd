"""DepthVLM end to end: logits and depth maps equal the PyTorch composition (HF Qwen3-VL + a torch
DPT head); one compilation per image-size bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from depthvlm_jax.model import depth_head as dh
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM
from depthvlm_jax.model.inputs import make_model_inputs
from tests.model import hf_reference as ref
from tests.model.test_depth_head import SMALL, TorchDPT, Wrapper, randomize


@pytest.fixture(scope="module")
def composed():
  config = Qwen3VLConfig.tiny()
  hf = ref.make_hf_model(config, seed=21)
  torch_head = randomize(Wrapper(TorchDPT(config.text.hidden_size, **SMALL)).eval(), seed=4)
  _, backbone = ref.jax_params_from_hf(hf, config)
  params = dict(backbone, depth_head=jax.tree.map(jax.numpy.asarray, dh.torch_state_dict_to_flax(torch_head.state_dict())))
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  return config, hf, torch_head.depth_head, model, params


def _torch_depth(config, hf, head, batch, patches, grids, bucket, output_size=None):
  """Reference: HF features at the image tokens -> torch DPT head, image by image. An image smaller
  than the bucket is laid at the top left of a zero token map of the bucket's size."""
  ids = torch.tensor(batch["input_ids"], dtype=torch.long)
  with torch.no_grad():
    out = hf(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]),
             mm_token_type_ids=(ids == config.image_token_id).int(),
             pixel_values=torch.tensor(np.concatenate(patches)),
             image_grid_thw=torch.tensor([[1, h, w] for h, w in grids]), output_hidden_states=True)
    feats = hf.model.get_image_features(torch.tensor(np.concatenate(patches)),
                                        torch.tensor([[1, h, w] for h, w in grids]))
    last = out.hidden_states[-1][ids == config.image_token_id]
    counts = [(h // 2) * (w // 2) for h, w in grids]
    starts = np.cumsum([0] + counts)
    depths = {}
    for i, (h, w) in enumerate(grids):
      th, tw = h // 2, w // 2
      if th > bucket[0] or tw > bucket[1]:
        continue
      maps = []
      for tokens in [lvl[i] for lvl in feats.deepstack_features] + [last[starts[i]:starts[i + 1]]]:
        canvas = torch.zeros(bucket[0], bucket[1], tokens.shape[-1])
        canvas[:th, :tw] = tokens.reshape(th, tw, -1)
        maps.append(canvas.reshape(1, bucket[0] * bucket[1], -1))
      depths[i] = head(maps, bucket[0], bucket[1], output_size)[0].numpy()
  return out.logits.numpy(), depths


def test_logits_and_depth_match_pytorch_composition(composed):
  config, hf, head, model, params = composed
  rng = np.random.default_rng(0)
  # two bucket images (3x4 tokens), one smaller (2x2 tokens: top left of the bucket's map), one larger
  grids = [(6, 8), (6, 8), (4, 4), (4, 10)]
  toks = [ref.build_prompt(rng, config, grids[:1]), ref.build_prompt(rng, config, grids[1:], (4, 3))]
  patches = [ref.random_image_patches(rng, g, config) for g in grids]
  batch = make_model_inputs(toks, config, patches, grids, padding_side="right")
  batch.pop("rope_deltas")
  out = jax.jit(lambda p, b: model.apply({"params": p}, **b, depth_grid=(3, 4)))(params, batch)
  ref_logits, ref_depth = _torch_depth(config, hf, head, batch, patches, grids, (3, 4))
  real = batch["attention_mask"].astype(bool)
  assert np.abs(np.asarray(out.logits)[real] - ref_logits[real]).max() < 1e-4
  assert out.depth.shape == (4, 96, 128)
  np.testing.assert_array_equal(np.asarray(out.depth_valid), [True, True, True, False])
  assert sorted(ref_depth) == [0, 1, 2]
  for i, d in ref_depth.items():
    rel = np.abs(np.asarray(out.depth[i]) - d) / d
    assert rel.max() < 1e-4, rel.max()
  assert np.all(np.asarray(out.depth) > 0)


def test_requested_output_size(composed):
  config, hf, head, model, params = composed
  rng = np.random.default_rng(1)
  grids = [(4, 6)]
  patches = [ref.random_image_patches(rng, g, config) for g in grids]
  batch = make_model_inputs([ref.build_prompt(rng, config, grids)], config, patches, grids)
  batch.pop("rope_deltas")
  out = jax.jit(lambda p, b: model.apply({"params": p}, **b, depth_grid=(2, 3), depth_output_size=(50, 70),
                                         compute_logits=False))(params, batch)
  _, ref_depth = _torch_depth(config, hf, head, batch, patches, grids, (2, 3), output_size=(50, 70))
  assert out.logits is None and out.depth.shape == (1, 50, 70)
  assert (np.abs(np.asarray(out.depth[0]) - ref_depth[0]) / ref_depth[0]).max() < 1e-4


@pytest.mark.slow
def test_one_compilation_per_bucket(composed):
  config, _, _, model, params = composed
  traces = []

  def forward(p, b, grid):
    traces.append(grid)
    return model.apply({"params": p}, **b, depth_grid=grid, compute_logits=False).depth

  fwd = jax.jit(forward, static_argnums=2)
  rng = np.random.default_rng(2)
  for _ in range(2):
    for grid in [(4, 4), (6, 8), (8, 6)]:
      toks = [ref.build_prompt(rng, config, [grid], (3, 2))] * 2
      patches = [ref.random_image_patches(rng, grid, config) for _ in range(2)]
      batch = make_model_inputs(toks, config, patches, [grid] * 2)
      batch.pop("rope_deltas")
      depth = fwd(params, batch, (grid[0] // 2, grid[1] // 2))
      assert depth.shape == (2, 16 * grid[0], 16 * grid[1])
  assert traces == [(2, 2), (3, 4), (4, 3)]


@pytest.mark.slow
def test_remat_and_bf16_options(composed):
  config, _, _, model, params = composed
  rng = np.random.default_rng(5)
  grids = [(4, 6)]
  batch = make_model_inputs([ref.build_prompt(rng, config, grids)], config,
                            [ref.random_image_patches(rng, g, config) for g in grids], grids)
  batch.pop("rope_deltas")

  def loss(p, m):
    out = m.apply({"params": p}, **batch, depth_grid=(2, 3))
    return out.depth.mean() + out.logits.astype(jax.numpy.float32).std(), (out.logits, out.depth)

  # one program per model: its gradients and, as aux, the forward's outputs
  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  g_plain, (_, depth32) = grad(params, model)
  g_remat, _ = grad(params, DepthVLM(config, head=DepthHeadConfig.tiny(), remat=True))
  for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  g16, (logits16, depth16) = grad(params, DepthVLM(config, head=DepthHeadConfig.tiny(), dtype=jax.numpy.bfloat16))
  assert logits16.dtype == jax.numpy.bfloat16 and depth16.dtype == jax.numpy.float32
  rel = np.abs(np.asarray(depth16) - np.asarray(depth32)) / np.asarray(depth32)
  assert np.median(rel) < 0.05
  assert all(x.dtype == jax.numpy.float32 for x in jax.tree.leaves(g16))


@pytest.mark.slow
def test_scanned_layers_equal_unrolled():
  """`scan_layers` (stacked per-layer params under lax.scan, with and without a remat policy) gives the
  unrolled model's outputs and gradients, on a model deep enough that both towers really scan:
  5 text layers after 3 DeepStack ones, vision runs of 2, 1, 3 and 2 blocks. The scans are the
  backbone's, so the model takes the MLP head (the DPT head's convolutions add a fifth to each of the
  four compiles; `test_remat_and_bf16_options` takes the DPT head)."""
  import dataclasses
  from depthvlm_jax.model.depthvlm import random_params
  tiny = Qwen3VLConfig.tiny()  # the full vocabulary: the prompts carry the real Qwen token ids
  config = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, depth=8, deepstack_visual_indexes=(1, 2, 5)),
                               text=dataclasses.replace(tiny.text, num_hidden_layers=8))
  head = DepthHeadConfig.tiny("mlp")
  plain = DepthVLM(config, head=head)
  params = random_params(plain, seed=3)
  rng = np.random.default_rng(7)
  grids = [(4, 6), (4, 6)]
  batch = make_model_inputs([ref.build_prompt(rng, config, grids[:1]), ref.build_prompt(rng, config, grids[1:])],
                            config, [ref.random_image_patches(rng, g, config) for g in grids], grids)
  batch.pop("rope_deltas")

  def run(p, m):
    out = m.apply({"params": p}, **batch, depth_grid=(2, 3))
    return out.depth.mean() + out.logits.std(), (out.logits, out.depth)

  run = jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=1)
  (_, (logits, depth)), grads = run(params, plain)
  # finite, so that the comparisons below compare numbers (NaN would equal NaN)
  assert all(bool(jnp.isfinite(x).all()) for x in [logits, depth, *jax.tree.leaves(grads)])
  # (a remat policy and scan_tail share one compile: each is its own code path)
  for options in (dict(), dict(remat=True),
                  dict(remat=True, remat_policy="dots_with_no_batch_dims_saveable", scan_tail=(1, 1))):
    scanned = DepthVLM(config, head=head, scan_layers=True, **options)
    (_, (s_logits, s_depth)), s_grads = run(params, scanned)
    np.testing.assert_allclose(np.asarray(s_logits), np.asarray(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s_depth), np.asarray(depth), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  # one while loop per scanned run: the text layers 3-7 and the vision runs 0-1, 3-5, 6-7 (block 2 alone
  # is a plain call)
  hlo = jax.jit(lambda p: DepthVLM(config, head=head, scan_layers=True).apply(
      {"params": p}, **batch, depth_grid=(2, 3)).depth).lower(params).as_text()
  assert hlo.count("stablehlo.while") == 4
