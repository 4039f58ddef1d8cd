"""Weight-only int8 inference through `qwix` post-training quantization.

`int8_model(model)` is a copy of the model whose backbone linear layers (the LLM's and the vision
tower's `Dense` kernels, and an untied LM head) compute with int8 kernels: qwix intercepts each
layer's `dot_general` and dequantizes the kernel (one float scale per output channel, absmax) inside
the product. Activations, convolutions, embeddings and the depth head stay in floating point.
`quantize_params(qmodel, params)` turns a float parameter tree into the quantized model's tree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import qwix

from depthvlm_jax.model.depthvlm import depthvlm_dummy_inputs
from depthvlm_jax.model.lora import METHODS

MODES = ("none", "int8")
# module paths (matched in full) whose linear layers get int8 kernels
INT8_TARGETS = r"(language_model|visual)/.*|lm_head"


def int8_model(model):
  """A copy of the linen DepthVLM `model` computing its backbone's linear layers with int8 kernels."""
  rule = qwix.QuantizationRule(module_path=INT8_TARGETS, weight_qtype=jnp.int8, op_names=("dot_general",))
  return qwix.quantize_model(model, qwix.PtqProvider([rule]), methods=METHODS)


def quantize_params(qmodel, params: Any) -> Any:
  """`params` (the float model's tree of jax.Arrays) quantized for `qmodel` (from `int8_model`)."""
  abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), **depthvlm_dummy_inputs(qmodel.config))["params"])
  return qwix.quantize_params(params, abstract)


def quantized(model, params: Any, mode: str):
  """(model, params) for `mode` ("none": unchanged; "int8": `int8_model` and its quantized tree)."""
  if mode not in MODES:
    raise ValueError(f"quantize={mode!r}: expected one of {MODES}")
  if mode == "none":
    return model, params
  qmodel = int8_model(model)
  return qmodel, quantize_params(qmodel, params)
