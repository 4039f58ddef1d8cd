"""One loader for the evaluation and prediction CLIs: a model directory or a training run -> model.

`load_model(DIR_OR_CKPT)` accepts
  * a hub id `org/name[@revision]` -> its snapshot folder (`model.hub.resolve_model_dir`), then as below;
  * a Hugging Face-layout DepthVLM directory (config.json + safetensors with `depth_head.*` keys,
    e.g. written by `depthvlm_jax.export`) -> `hf_checkpoint.load_depthvlm`;
  * a Hugging Face Qwen3-VL directory without a depth head -> `hf_checkpoint.load_qwen3_vl` plus a
    freshly initialised (untrained) head: text answers work, depth is random (`head_trained=False`);
  * a training workdir (`config.json` of the ml_collections config + `checkpoints/`) ->
    `model_from_config.build_model(config)` and `checkpoints.restore_params(workdir, like)`, read straight onto
    the devices in the requested dtype; a LoRA run's adapters are merged into the kernels
    (`lora.merge_adapters`) and the plain model returned.
The tokenizer comes from the directory (or the run's `model.hf_dir`) when it has one, else the
embedded default; the image-processor settings likewise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

from depthvlm_jax import sharding
from depthvlm_jax.model import hf_checkpoint, hub, lora
from depthvlm_jax.model import quantize as quantization
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, depthvlm_dummy_inputs
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.processing.tokenizer import load_tokenizer


class ModelLoadError(ValueError):
  """A path that is neither a model directory nor a training workdir (message says what was found)."""


@dataclasses.dataclass
class LoadedModel:
  model: DepthVLM
  params: Any  # unboxed parameter tree (placed on `mesh` when one was given)
  tokenizer: Any
  processor: ImageProcessorConfig
  kind: str  # "hf_depthvlm" | "hf_qwen3_vl" | "workdir"
  head_trained: bool  # False: a plain Qwen3-VL directory with a random depth head
  path: str


def _is_workdir(p: epath.Path) -> bool:
  return (p / "checkpoints").is_dir() and (p / "config.json").exists()


def _has_depth_head(model_dir: pathlib.Path, cfg: dict[str, Any]) -> bool:
  if "depth_head_type" in cfg:
    return True
  files = hf_checkpoint.weight_files(model_dir)
  if files[0].suffix != ".safetensors":
    return False
  import safetensors
  for f in files:
    with safetensors.safe_open(str(f), framework="numpy") as r:
      if any(k.startswith("depth_head.") for k in r.keys()):
        return True
  return False


def _tokenizer_and_processor(hf_dir: str | pathlib.Path | None):
  d = pathlib.Path(hub.resolve_model_dir(hf_dir)) if hf_dir else None
  has_tok = d is not None and ((d / "tokenizer.json").exists() or (d / "vocab.json").exists())
  tokenizer = load_tokenizer(d if has_tok else None)
  processor = ImageProcessorConfig.from_hf_dir(d) if d is not None else ImageProcessorConfig()
  return tokenizer, processor


def param_shardings(model: DepthVLM, mesh) -> Any:
  """NamedShardings of the model's parameters on `mesh` (logical-axis rules of `sharding.py`)."""
  boxed = abstract_params(model, **depthvlm_dummy_inputs(model.config), boxed=True)
  return sharding.logical_shardings(boxed, mesh)


def load_model(path: str | pathlib.Path, dtype=jnp.float32, mesh=None, seed: int = 0,
               quantize: str = "none") -> LoadedModel:
  """Loads a DepthVLM/Qwen3-VL HF directory or a training workdir (see the module docstring).

  Args:
    path: the directory.
    dtype: the parameters' dtype (each array is converted as it is read).
    mesh: optional `jax.sharding.Mesh`; parameters are placed with the logical sharding rules.
    seed: seed of the random depth head given to a plain Qwen3-VL directory.
    quantize: "none", or "int8": the backbone's linear layers with int8 weights
      (`model.quantize.int8_model`; activations and the depth head stay in `dtype`).
  """
  if quantize not in quantization.MODES:
    raise ModelLoadError(f"quantize={quantize!r}: expected one of {quantization.MODES}")
  loaded = _load(path, dtype, mesh, seed)
  model, params = quantization.quantized(loaded.model, loaded.params, quantize)
  return dataclasses.replace(loaded, model=model, params=params)


def _load(path, dtype, mesh, seed: int) -> LoadedModel:
  # a training workdir may be on an object store (gs://...); a hub id resolves to its snapshot folder
  p = epath.Path(path if "://" in str(path) else hub.resolve_model_dir(path))
  if not p.is_dir():
    raise ModelLoadError(f"{p}: not a directory (expected a Hugging Face model directory with config.json "
                         "and safetensors, a hub id org/name[@revision], or a training workdir with config.json "
                         "and checkpoints/)")
  if _is_workdir(p):
    import ml_collections
    from depthvlm_jax.runs import checkpoints, freeze, model_from_config
    try:
      config = ml_collections.ConfigDict(json.loads((p / "config.json").read_text()))
      model = model_from_config.build_model(config)
    except (ValueError, KeyError, AttributeError, TypeError) as e:  # JSONDecodeError is a ValueError
      raise ModelLoadError(f"{p / 'config.json'}: not a valid training config ({type(e).__name__}: {e}); it "
                           "records the run's settings, restore it from a backup or rewrite it") from None
    # Every array is read straight onto its shards of `mesh` (one device without one) in `dtype`: the
    # model never passes through host memory, and no copy is made beside it.
    target_mesh = mesh if mesh is not None else sharding.make_mesh({}, jax.devices()[:1])
    like, _ = model_from_config.params_like(config, model, target_mesh)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding), like)
    trainable, frozen = checkpoints.restore_params(p, like)
    params = freeze.merge_params(trainable, frozen)
    if model_from_config.lora_rank(config) > 0:  # LoRA adapters folded into the kernels: the plain model
      params = lora.merge_adapters(params, model_from_config.lora_rank(config), config.train.lora_alpha)
      model = model_from_config.build_model(config, adapters=False)
    tokenizer, processor = _tokenizer_and_processor(config.model.hf_dir or None)
    return LoadedModel(model, params, tokenizer, processor, "workdir", True, str(p))
  if not (p / "config.json").exists():
    raise ModelLoadError(f"{p}: no config.json (expected a Hugging Face model directory, or a training "
                         "workdir with config.json and checkpoints/)")
  cfg = hf_checkpoint.read_config_dict(p)
  tokenizer, processor = _tokenizer_and_processor(p)
  if _has_depth_head(p, cfg):
    model = DepthVLM(Qwen3VLConfig.from_hf_dict(cfg), head=DepthHeadConfig.from_hf_dict(cfg))
    shardings = param_shardings(model, mesh) if mesh is not None else None
    model, params = hf_checkpoint.load_depthvlm(p, dtype, shardings)
    return LoadedModel(model, params, tokenizer, processor, "hf_depthvlm", True, str(p))
  model = DepthVLM(Qwen3VLConfig.from_hf_dict(cfg), head=DepthHeadConfig.from_hf_dict(cfg))
  shardings = param_shardings(model, mesh) if mesh is not None else None
  _, backbone = hf_checkpoint.load_qwen3_vl(p, dtype, None if shardings is None else
                                            {k: v for k, v in shardings.items() if k != "depth_head"})
  # Only the head runs in this init, so only its parameters are created (Linen creates them on first call).
  maps = [jnp.zeros((1, 1, 1, model.config.text.hidden_size), jnp.float32)] * 4
  head = jax.jit(lambda r: nn.unbox(model.init(r, maps, method=lambda m, x: m.depth_head(x))["params"]["depth_head"]))(
      jax.random.key(seed))
  head = jax.tree.map(lambda x: x.astype(dtype), head)
  if shardings:
    head = sharding.place_params(head, shardings["depth_head"])
  params = dict(backbone, depth_head=head)
  logging.warning("%s: Qwen3-VL directory without depth_head.* weights; the depth head is randomly "
                  "initialised (depth maps are meaningless, text answers are the base model's)", p)
  return LoadedModel(model, params, tokenizer, processor, "hf_qwen3_vl", False, str(p))
