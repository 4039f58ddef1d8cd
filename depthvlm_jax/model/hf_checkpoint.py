"""Reading Hugging Face model directories (config.json + safetensors, single or sharded).

Tensors stream one at a time from the safetensors files through the key map in `hf_params.py`,
each converted, cast and placed (optionally onto a sharding) before the next is read, so loading
needs about one model's worth of memory, not two. Pickle checkpoints (`*.bin`, `*.pt`) are refused
unless `allow_pickle=True`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from flax import traverse_util

from depthvlm_jax.model import hf_params
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, depthvlm_dummy_inputs
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.model.qwen3_vl import Qwen3VL, dummy_inputs


class CheckpointError(ValueError):
  """A model directory that cannot be read; the message names the file and what was expected."""


def weight_files(model_dir: str | pathlib.Path, allow_pickle: bool = False) -> list[pathlib.Path]:
  """The weight files of a HF directory, in index order."""
  d = pathlib.Path(model_dir)
  if not d.is_dir():
    raise CheckpointError(f"{d}: not a directory (expected a Hugging Face model directory)")
  index = d / "model.safetensors.index.json"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: unreadable index ({e!r}); expected a 'weight_map' object") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (d / f).exists()]
    if missing:
      raise CheckpointError(f"{index}: lists shard files that do not exist: {missing}")
    return [d / f for f in files]
  if (d / "model.safetensors").exists():
    return [d / "model.safetensors"]
  pickles = sorted(d.glob("*.bin")) + sorted(d.glob("*.pt"))
  if pickles:
    if not allow_pickle:
      raise CheckpointError(f"{d}: only pickle weights {[p.name for p in pickles]} found, and pickle files are not "
                            "loaded (they can run arbitrary code); convert them to safetensors, e.g. with transformers: "
                            "from_pretrained(DIR).save_pretrained(NEW_DIR), and use NEW_DIR (in Python, "
                            "allow_pickle=True loads trusted pickle files)")
    return pickles
  raise CheckpointError(f"{d}: no model.safetensors, model.safetensors.index.json or *.bin weights")


def iter_tensors(files: list[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (key, np.ndarray) one tensor at a time (bf16 stays bf16 via ml_dtypes)."""
  for f in files:
    if f.suffix == ".safetensors":
      try:
        with safetensors.safe_open(str(f), framework="numpy") as reader:
          for key in reader.keys():
            yield key, reader.get_tensor(key)
      except safetensors.SafetensorError as e:
        raise CheckpointError(f"{f}: corrupt safetensors file ({e})") from None
    else:
      import torch  # only for explicitly allowed pickle checkpoints
      state = torch.load(f, map_location="cpu", weights_only=True)
      for key, t in state.items():
        yield key, t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def read_config_dict(model_dir: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(model_dir) / "config.json"
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise CheckpointError(f"{path}: missing (a Hugging Face model directory needs config.json)") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def placer(dtype, shardings: Any | None, dtypes: Any | None = None) -> Callable[[tuple[str, ...], np.ndarray], jax.Array]:
  """A `place` hook: cast to `dtype` (or the path's entry of the `dtypes` tree) and put on the
  sharding of that path (if given)."""
  flat = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  flat_dtypes = traverse_util.flatten_dict(dtypes) if dtypes is not None else {}

  def place(path, arr):
    arr = np.asarray(arr).astype(flat_dtypes.get(path, dtype), copy=False)
    sharding = flat.get(path)
    return jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)

  return place


def load_qwen3_vl(model_dir: str | pathlib.Path, dtype=jnp.float32, shardings: Any | None = None,
                  allow_pickle: bool = False, other_prefixes: tuple[str, ...] = (), dtypes: Any | None = None):
  """Loads a HF Qwen3-VL directory. Returns (config, params).

  Args:
    model_dir: directory with config.json and safetensors weights.
    dtype: parameter dtype (float32 master weights or bfloat16).
    shardings: optional tree of `jax.sharding.Sharding` matching the params (load straight into shards).
    allow_pickle: accept `*.bin`/`*.pt` weights.
    other_prefixes: key prefixes (e.g. "depth_head.") handled by another loader and skipped here.
    dtypes: optional tree of per-parameter dtypes overriding `dtype` (e.g. frozen towers in bfloat16
      next to trainable float32 ones).
  """
  config = Qwen3VLConfig.from_hf_dict(read_config_dict(model_dir))
  expected = abstract_params(Qwen3VL(config), **dummy_inputs(config))
  files = weight_files(model_dir, allow_pickle)
  params = hf_params.hf_to_params(iter_tensors(files), config, expected, placer(dtype, shardings, dtypes),
                                  other_prefixes=other_prefixes,
                                  what="checkpoint does not match the Qwen3-VL config")
  return config, params


def load_depthvlm(model_dir: str | pathlib.Path, dtype=jnp.float32, shardings: Any | None = None,
                  allow_pickle: bool = False):
  """Loads a DepthVLM directory (Qwen3-VL layout plus `depth_head.*`). Returns (model, params).

  One pass over the files: backbone and `depth_head.*` tensors go through the same key map. A plain
  Qwen3-VL directory (no `depth_head.*` keys) is refused here: use `load_qwen3_vl` and a fresh head
  (stage-1 training) instead.
  """
  d = read_config_dict(model_dir)
  config = Qwen3VLConfig.from_hf_dict(d)
  model = DepthVLM(config, head=DepthHeadConfig.from_hf_dict(d))
  expected = abstract_params(model, **depthvlm_dummy_inputs(config))
  params = hf_params.hf_to_params(iter_tensors(weight_files(model_dir, allow_pickle)), config, expected,
                                  placer(dtype, shardings), what="checkpoint does not match the DepthVLM config")
  return model, params
