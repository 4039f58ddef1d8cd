"""The model a run's config describes, and its parameter layout (shapes, dtypes, shardings).

Used by the trainer to build a run and by the tools that read a run back (`evaluation.loading`).
"""

from __future__ import annotations

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
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.runs import freeze

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config) -> DepthVLM:
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
  return DepthVLM(backbone, head=head, dtype=DTYPES[config.model.compute_dtype],
                  param_dtype=DTYPES[config.model.param_dtype], remat=config.model.remat,
                  remat_policy=config.model.remat_policy, scan_layers=config.model.scan_layers)


def params_like(config, model: DepthVLM, mesh) -> tuple[dict[str, Any], dict[tuple[str, ...], bool]]:
  """(abstract params, trainable mask): every parameter as a ShapeDtypeStruct carrying the sharding
  of the logical rules on `mesh` and the dtype the run keeps it in (`model.param_dtype`, or
  `model.frozen_dtype` for the parameters `train.trainable` freezes). Nothing is allocated."""
  boxed = abstract_params(model, **depthvlm_dummy_inputs(model.config), boxed=True)
  shapes = nn.unbox(boxed)
  mask = freeze.trainable_mask(shapes, list(map(tuple, config.train.trainable)))
  frozen_dtype = DTYPES[config.model.frozen_dtype]
  flat_sh = flatten_dict(sharding.logical_shardings(boxed, mesh))
  like = {path: jax.ShapeDtypeStruct(x.shape, x.dtype if mask[path] else frozen_dtype, sharding=flat_sh[path])
          for path, x in flatten_dict(shapes).items()}
  return unflatten_dict(like), mask
