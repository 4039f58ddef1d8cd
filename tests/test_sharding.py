"""Sharded == unsharded on 8 simulated devices, and mesh/rule edge cases."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from depthvlm_jax import aot, sharding
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, random_params
from depthvlm_jax.model.inputs import make_model_inputs
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.model.qwen3_vl import Qwen3VL, dummy_inputs
from tests.model import hf_reference as ref


def test_make_mesh_autofill_and_errors():
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match="unknown"):
    sharding.make_mesh({"model": 8})


def test_every_parameter_has_logical_names_and_shards():
  config = Qwen3VLConfig.tiny()
  model = Qwen3VL(config)
  boxed = abstract_params(model, **dummy_inputs(config), boxed=True)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = sharding.logical_shardings(boxed, mesh)
  flat = {"/".join(str(k.key) for k in path): s for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  assert flat["language_model/layers_0/mlp/gate_proj/kernel"].spec == P("fsdp", "tensor")
  assert flat["language_model/embed_tokens"].spec == P("tensor", "fsdp")
  # norms are never sharded
  assert flat["language_model/layers_0/self_attn/q_norm/scale"].spec == P(None)


def test_place_params_puts_each_leaf_on_its_sharding():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  spec = {"a": {"w": P("fsdp", "tensor")}, "b": P(None)}
  shardings = jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), spec,
                           is_leaf=lambda x: isinstance(x, P))
  host = {"a": {"w": np.arange(32, dtype=np.float32).reshape(4, 8)}, "b": np.ones(3, np.float32)}
  placed = sharding.place_params(host, shardings)
  assert placed["a"]["w"].sharding == shardings["a"]["w"] and placed["b"].sharding == shardings["b"]
  np.testing.assert_array_equal(np.asarray(placed["a"]["w"]), host["a"]["w"])
  with pytest.raises(ValueError, match="differ at 2 paths.*a/v.*a/w"):
    sharding.place_params({"a": {"v": host["a"]["w"]}, "b": host["b"]}, shardings)


@pytest.mark.slow
def test_sharded_forward_equals_unsharded():
  config = Qwen3VLConfig.tiny()
  hf = ref.make_hf_model(config, seed=11)
  model, params = ref.jax_params_from_hf(hf, config)
  rng = np.random.default_rng(3)
  grids = [(4, 6), (6, 4), (4, 4), (8, 4)]
  toks = [ref.build_prompt(rng, config, [g], (3, 2)) for g in grids]
  batch = make_model_inputs(toks, config, [ref.random_image_patches(rng, g, config) for g in grids], grids)
  batch.pop("rope_deltas")
  fwd = jax.jit(lambda p, b: model.apply({"params": p}, **b))
  expected = fwd(params, batch)

  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = abstract_params(model, **dummy_inputs(config), boxed=True)
  param_sh = sharding.logical_shardings(boxed, mesh)
  sharded_params = jax.device_put(params, param_sh)
  batch_sh = {k: sharding.activation_sharding(mesh, *(("batch",) if k not in ("position_ids",) else (None, "batch")),
                                               shape=v.shape) for k, v in batch.items()}
  batch_sh["pixel_values"] = sharding.activation_sharding(mesh, "images", shape=batch["pixel_values"].shape)
  batch_sh["image_grid_hw"] = sharding.activation_sharding(mesh, "images", shape=batch["image_grid_hw"].shape)
  sharded_batch = jax.device_put(batch, batch_sh)
  # the training form: row-local image placement, activation constraints on (tensor-parallel included)
  got = jax.jit(sharding.in_mesh(lambda p, b: model.apply({"params": p}, **b, images_per_row=1), mesh))(
      sharded_params, sharded_batch)
  assert len(sharded_params["language_model"]["embed_tokens"].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(expected.logits), atol=1e-5, rtol=1e-5)
  for a, b in zip((*got.image_features.deepstack, got.image_features.llm_last),
                  (*expected.image_features.deepstack, expected.image_features.llm_last)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_constrain_applies_the_rules_only_under_a_context_mesh():
  x = np.ones((8, 6), np.float32)
  assert sharding.constrain(x, "batch", "act_mlp") is x  # no mesh: the model runs unchanged
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  f = jax.jit(sharding.in_mesh(lambda x: sharding.constrain(x * 2, "batch", "act_mlp"), mesh))
  on_mesh = jax.device_put(x, sharding.activation_sharding(mesh))  # inputs on the mesh: its devices run f
  assert f(on_mesh).sharding.spec == P("data", "tensor")
  assert f(on_mesh[:3]).sharding.spec == P(None, "tensor")  # 3 rows do not split over 4: whole, as weights
  with pytest.raises(ValueError, match="2 names"):
    f(on_mesh[None])


@pytest.mark.slow
def test_row_local_forward_on_a_sharded_batch_moves_no_activations():
  """Data parallel over 8 devices: with one image per row (`images_per_row=1`) and the activation
  constraints (`sharding.in_mesh`), the compiled forward has no all-gather (nor any other collective:
  the weights are replicated, so each would move activations) and equals the single-device result.
  The batch-order placement, compiled the same way, does gather: the check would see a regression."""
  config = Qwen3VLConfig.tiny()
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  params = random_params(model, seed=5)
  rng = np.random.default_rng(4)
  grids = [(4, 6), (6, 4), (4, 6), (8, 4)] * 2
  toks = [ref.build_prompt(rng, config, [g], (3, 2 + i % 3)) for i, g in enumerate(grids)]
  batch = make_model_inputs(toks, config, [ref.random_image_patches(rng, g, config) for g in grids], grids,
                            padding_side="right")
  batch.pop("rope_deltas")

  def fwd(images_per_row):
    return lambda p, b: model.apply({"params": p}, **b, depth_grid=(2, 3), images_per_row=images_per_row)

  expected = jax.jit(fwd(None))(params, batch)
  mesh = sharding.make_mesh({"data": 8})
  names = {"position_ids": (None, "batch"), "pixel_values": ("images",), "image_grid_hw": ("images",)}
  sharded = {k: jax.device_put(v, sharding.activation_sharding(mesh, *names.get(k, ("batch",)), shape=v.shape))
             for k, v in batch.items()}
  assert sharded["input_ids"].sharding.spec[0] == "data"
  replicated = jax.device_put(params, sharding.activation_sharding(mesh))

  def compiled(images_per_row):
    return jax.jit(sharding.in_mesh(fwd(images_per_row), mesh)).lower(replicated, sharded).compile()

  local = compiled(1)
  assert aot.collective_stats(local.as_text()) == {}
  got = local(replicated, sharded)
  for a, b in ((got.logits, expected.logits), (got.hidden_states, expected.hidden_states), (got.depth, expected.depth)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  assert np.asarray(got.depth_valid).tolist() == [True, False, True, False] * 2
  assert got.depth.sharding.spec[0] == "data"
  assert "all-gather" in aot.collective_stats(compiled(None).as_text())
