"""Weight-only int8 inference through qwix: the backbone's linear layers hold int8 kernels, and the
outputs stay close to the float model's.

Tolerances (tiny random model, weights normal(0, 0.05)): logits within 6% of the largest logit
(measured 3.7%), depth within 0.1% (measured 1e-5 relative: the depth head itself stays float), and
at least 85% of the greedy next tokens unchanged (measured 92%)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from depthvlm_jax import generate as gen
from depthvlm_jax.model import quantize
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, random_params
from tests.model.test_lora import _batch


@pytest.fixture(scope="module")
def models():
  config = Qwen3VLConfig.tiny()
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  params = jax.tree.map(jnp.asarray, random_params(model, seed=1))
  qmodel, qparams = quantize.quantized(model, params, "int8")
  return config, model, params, qmodel, qparams


def test_backbone_kernels_are_int8(models):
  config, model, params, qmodel, qparams = models
  dense = [p[:-1] for p, x in flatten_dict(params).items() if p[-1] == "kernel" and x.ndim == 2 and p[0] != "depth_head"]
  flat = flatten_dict(qparams)  # a quantized kernel is one leaf here: qwix's array with its scale
  int8 = {p[:-1] for p, x in flat.items() if any(leaf.dtype == jnp.int8 for leaf in jax.tree.leaves(x))}
  assert dense and set(dense) == int8
  q = flat[("language_model", "layers_0", "self_attn", "q_proj", "kernel")].array
  assert q.qvalue.shape == params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].shape
  assert q.scale.shape == (1, q.qvalue.shape[1])  # one scale per output channel
  # the depth head keeps its float weights, unchanged
  a, b = flatten_dict(params["depth_head"]), flatten_dict(qparams["depth_head"])
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_int8_outputs_close_to_float(models):
  config, model, params, qmodel, qparams = models
  batch = _batch(config)
  run = jax.jit(lambda p, m: m.apply({"params": p}, **batch, depth_grid=(2, 3)), static_argnums=1)
  got, want = run(qparams, qmodel), run(params, model)
  lq, lf = np.asarray(got.logits), np.asarray(want.logits)
  real = batch["attention_mask"].astype(bool)
  err = np.abs(lq - lf)[real].max() / np.abs(lf[real]).max()
  assert 0 < err < 0.06, err  # nonzero: the kernels really are rounded
  depth_err = (np.abs(np.asarray(got.depth) - np.asarray(want.depth)) / np.asarray(want.depth)).max()
  assert depth_err < 1e-3, depth_err
  assert (lq.argmax(-1) == lf.argmax(-1))[real].mean() >= 0.85


@pytest.mark.slow
def test_int8_generation_with_kv_cache(models):
  """Prefill and cached decoding (what `predict` runs) work on the int8 model."""
  config, model, params, qmodel, qparams = models
  b = _batch(config)
  sampling = gen.SamplingConfig(max_new_tokens=3, eos_token_ids=(-1,))
  outs = [gen.generate_tokens(m, p, b["input_ids"], b["attention_mask"], b["position_ids"], jax.random.key(0),
                              b["pixel_values"], b["image_grid_hw"], sampling=sampling, depth_grid=(2, 3))
          for m, p in ((model, params), (qmodel, qparams))]
  (tokens, prefill), (qtokens, qprefill) = outs
  assert np.asarray(qtokens).shape == np.asarray(tokens).shape == (2, 3)
  assert np.isfinite(np.asarray(qprefill.depth)).all()
