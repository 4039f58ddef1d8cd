"""`model.frozen_dtype=bfloat16`: frozen towers stored in bf16, trainable parameters in fp32.

With bf16 compute (the paper presets) every matmul already reads its weights rounded to bf16, so
storing the frozen towers rounded changes little. Tolerances on the tiny model at random init, a
stage-1 depth loss over 4 images: loss within 1e-4 relative, the head's gradient within 5e-3
relative (global norm of the difference; measured: loss equal to 7 digits, gradient 6.7e-4).
"""

import pytest
import ml_collections
import jax
import jax.numpy as jnp
import numpy as np

from depthvlm_jax import sharding
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, random_params
from depthvlm_jax.runs import freeze, model_from_config
from depthvlm_jax.train.step import loss_terms
from tests.train.test_step import STAGE1, make_batch

RULES = [list(r) for r in STAGE1]


def test_params_like_keeps_only_frozen_params_in_bf16():
  model = DepthVLM(Qwen3VLConfig.tiny(vocab_size=512), head=DepthHeadConfig.tiny())
  mesh = sharding.make_mesh({"fsdp": -1})
  for frozen_dtype, want in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
    config = ml_collections.ConfigDict({"model": {"frozen_dtype": frozen_dtype}, "train": {"trainable": RULES}})
    like, mask = model_from_config.params_like(config, model, mesh)
    flat = freeze.flatten(like)
    assert {p for p, t in mask.items() if t} == {p for p in flat if p[0] == "depth_head"}
    assert {x.dtype for p, x in flat.items() if mask[p]} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for p, x in flat.items() if not mask[p]} == {jnp.dtype(want)}
    assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in flat.values())


@pytest.mark.slow
def test_bf16_frozen_towers_match_fp32_with_bf16_compute():
  config = Qwen3VLConfig.tiny(vocab_size=151936)
  model = DepthVLM(config, head=DepthHeadConfig.tiny(), dtype=jnp.bfloat16)
  params = random_params(model, seed=1)
  trainable, frozen = freeze.split_params(params, freeze.trainable_mask(params, STAGE1))
  frozen_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
  batch = make_batch(config)

  @jax.jit
  def loss_and_grad(tp, fp):
    def loss(tp):
      t = loss_terms(model, freeze.merge_params(tp, fp), batch, (2, 3), with_lm=False)
      return t["depth_sum"] / t["depth_count"]
    return jax.value_and_grad(loss)(tp)

  loss32, grad32 = loss_and_grad(trainable, frozen)
  loss16, grad16 = loss_and_grad(trainable, frozen_bf16)
  assert np.isfinite(float(loss32)) and float(loss32) > 0
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=1e-4)
  diff = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), grad16, grad32)
  norm = lambda t: float(jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(t))))
  assert norm(grad32) > 0
  print(f"loss {float(loss32):.6f} vs {float(loss16):.6f}; grad rel diff {norm(diff) / norm(grad32):.2e}")
  assert norm(diff) <= 5e-3 * norm(grad32)
