"""The model a run's config describes, and its parameter layout (shapes, dtypes, shardings).

Used by the trainer to build a run and by the tools that read a run back (`evaluation.loading`).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from depthvlm_jax import sharding
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, depthvlm_dummy_inputs
from depthvlm_jax.model.hf_checkpoint import read_config_dict
from depthvlm_jax.model.hub import resolve_model_dir
from depthvlm_jax.model import lora
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.runs import freeze

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def lora_rank(config) -> int:
  """`train.lora_rank` (0 in configs written before LoRA existed)."""
  return int(config.train.get("lora_rank", 0))


def build_model(config, adapters: bool = True) -> DepthVLM:
  """The run's model; with `train.lora_rank` > 0 (and `adapters`) it carries the LoRA adapters
  `train.lora_targets` selects (`model.lora.with_lora`), otherwise it is the plain DepthVLM."""
  if config.model.hf_dir:
    d = read_config_dict(resolve_model_dir(config.model.hf_dir))
    backbone = Qwen3VLConfig.from_hf_dict(d)
  else:
    backbone = {"tiny": Qwen3VLConfig.tiny, "4b": Qwen3VLConfig.qwen3_vl_4b,
                "8b": Qwen3VLConfig.qwen3_vl_8b}[config.model.size]()
  head = DepthHeadConfig(config.model.head_type, config.model.mlp_feature_mode,
                         features=config.model.dpt_features, out_channels=tuple(config.model.dpt_out_channels),
                         head_features=config.model.dpt_head_features)
  backbone = backbone.with_attention_impl(config.model.attention_impl)  # "auto": by the mesh's platform
  model = DepthVLM(backbone, head=head, dtype=DTYPES[config.model.compute_dtype],
                   param_dtype=DTYPES[config.model.param_dtype], remat=config.model.remat,
                   remat_policy=config.model.remat_policy, scan_layers=config.model.scan_layers)
  if adapters and lora_rank(config) > 0:
    model = lora.with_lora(model, lora_rank(config), config.train.lora_alpha, config.train.lora_targets)
  return model


# The LLM's own weights, frozen while LoRA adapters train.
LLM_PARAMS = re.compile(r"(language_model|lm_head)/.*")


def trainable_mask(config, shapes) -> dict[tuple[str, ...], bool]:
  """{flat path: trainable?} of `train.trainable`; with LoRA (`train.lora_rank` > 0) the adapters are
  trainable and the LLM's weights and the adapted kernels frozen, whatever the rules say of them."""
  adapters = [p for p in flatten_dict(shapes) if lora.is_adapter(p)]
  base = unflatten_dict({p: x for p, x in flatten_dict(shapes).items() if not lora.is_adapter(p)})
  mask = freeze.trainable_mask(base, list(map(tuple, config.train.trainable)))
  if adapters:
    adapted = {p[:-1] + (p[-1][:-len("_lora_a")],) for p in adapters}
    mask = {p: t and p not in adapted and not LLM_PARAMS.fullmatch(freeze.path_str(p)) for p, t in mask.items()}
    mask.update({p: True for p in adapters})
  return mask


def params_like(config, model: DepthVLM, mesh) -> tuple[dict[str, Any], dict[tuple[str, ...], bool]]:
  """(abstract params, trainable mask): every parameter as a ShapeDtypeStruct carrying the sharding
  of the logical rules on `mesh` and the dtype the run keeps it in (`model.param_dtype`, or
  `model.frozen_dtype` for the parameters `train.trainable` freezes). Nothing is allocated."""
  boxed = abstract_params(model, **depthvlm_dummy_inputs(model.config), boxed=True)
  shapes = nn.unbox(boxed)
  mask = trainable_mask(config, shapes)
  frozen_dtype = DTYPES[config.model.frozen_dtype]
  flat_sh = flatten_dict(sharding.logical_shardings(boxed, mesh))
  like = {path: jax.ShapeDtypeStruct(x.shape, x.dtype if mask[path] else frozen_dtype, sharding=flat_sh[path])
          for path, x in flatten_dict(shapes).items()}
  return unflatten_dict(like), mask
