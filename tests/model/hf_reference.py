"""Tiny random Hugging Face Qwen3-VL models (PyTorch, fp32) built locally, and inputs for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from depthvlm_jax.model import hf_params
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.model.qwen3_vl import Qwen3VL, dummy_inputs

import jax


def make_hf_model(config: Qwen3VLConfig, seed: int = 0):
  """A random-init `Qwen3VLForConditionalGeneration` with our config (eager attention, eval mode)."""
  torch.manual_seed(seed)
  hf_config = transformers.Qwen3VLConfig(**config.to_hf_dict())
  hf_config._attn_implementation = "eager"
  model = transformers.Qwen3VLForConditionalGeneration(hf_config).eval()
  with torch.no_grad():  # HF zero-inits some norms/biases: randomise all so the test sees every weight
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  return model


def jax_params_from_hf(model, config: Qwen3VLConfig):
  flax_model = Qwen3VL(config)
  expected = abstract_params(flax_model, **dummy_inputs(config))
  state = ((k, v.detach().numpy()) for k, v in model.state_dict().items())
  return flax_model, jax.tree.map(jax.numpy.asarray, hf_params.hf_to_params(state, config, expected))


def random_image_patches(rng: np.random.Generator, grid_hw, config: Qwen3VLConfig) -> np.ndarray:
  h, w = grid_hw
  return rng.standard_normal((h * w, config.vision.patch_dim)).astype(np.float32)


def build_prompt(rng: np.random.Generator, config: Qwen3VLConfig, grids, n_text=(5, 4)) -> list[int]:
  """im_start, text, [vision_start, image_pad * n, vision_end, text] per image, im_end."""
  ids = [151644] + list(rng.integers(100, 5000, n_text[0]))
  for gh, gw in grids:
    n = (gh // 2) * (gw // 2)
    ids += [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]
    ids += list(rng.integers(100, 5000, n_text[1]))
  return ids + [151645]
