"""Greedy generation equals HF `generate`; sampling settings behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from depthvlm_jax import generate as gen
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.inputs import make_model_inputs
from tests.model import hf_reference as ref


def test_greedy_matches_hf_generate():
  config = Qwen3VLConfig.tiny()
  hf = ref.make_hf_model(config, seed=3)
  with torch.no_grad():  # sharpen the random LM head so greedy choices have clear margins
    hf.lm_head.weight.mul_(20.0)
  flax_model, params = ref.jax_params_from_hf(hf, config)
  rng = np.random.default_rng(5)
  grids = [(4, 6), (6, 4)]
  toks = [ref.build_prompt(rng, config, grids[:1], (3, 2)), ref.build_prompt(rng, config, grids[1:], (7, 4))]
  patches = [ref.random_image_patches(rng, g, config) for g in grids]
  batch = make_model_inputs(toks, config, patches, grids, padding_side="left")
  gen.check_left_padded(batch["attention_mask"])
  sampling = gen.SamplingConfig(max_new_tokens=16, eos_token_ids=(151645,))
  tokens, _ = gen.generate_tokens(flax_model, params, batch["input_ids"], batch["attention_mask"],
                                  batch["position_ids"], jax.random.key(0), batch["pixel_values"],
                                  batch["image_grid_hw"], sampling=sampling)
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                      attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                      mm_token_type_ids=torch.tensor(batch["input_ids"] == config.image_token_id, dtype=torch.int),
                      pixel_values=torch.tensor(np.concatenate(patches)),
                      image_grid_thw=torch.tensor([[1, h, w] for h, w in grids]),
                      max_new_tokens=16, do_sample=False, eos_token_id=151645, pad_token_id=151643)
  expected = out[:, batch["input_ids"].shape[1]:].numpy()
  assert expected.shape == (2, 16)
  np.testing.assert_array_equal(np.asarray(tokens), expected)


def test_sampling_filters():
  logits = jnp.array([[5.0, 4.0, 1.0, -3.0]] * 1)
  keys = jax.random.split(jax.random.key(0), 200)
  top1 = gen.SamplingConfig(temperature=1.0, top_k=1)
  assert all(int(gen._select(logits, k, top1)[0]) == 0 for k in keys[:20])
  top2 = gen.SamplingConfig(temperature=1.0, top_k=2)
  picks = {int(gen._select(logits, k, top2)[0]) for k in keys}
  assert picks == {0, 1}
  nucleus = gen.SamplingConfig(temperature=1.0, top_p=0.5)  # first token alone has p ~ 0.71
  assert {int(gen._select(logits, k, nucleus)[0]) for k in keys} == {0}


def test_strip_after_eos_and_padding_check():
  assert gen.strip_after_eos(np.array([[5, 6, 151645, 0], [1, 2, 3, 4]]), (151645,)) == [[5, 6], [1, 2, 3, 4]]
  with pytest.raises(ValueError, match="left-padded"):
    gen.check_left_padded(np.array([[1, 1, 0]]))
