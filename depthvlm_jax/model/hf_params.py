"""One explicit key map between the official HF DepthVLM / Qwen3-VL state dict and our Flax tree.

A table of (regex over the HF key, kind) decides how each tensor is transformed; the Flax path is
the HF key with the `model.` prefix dropped, `name.N` turned into `name_N` and the final `weight`
renamed by kind. The backbone (`model.visual.*`, `model.language_model.*`, `lm_head.*`) and the
depth head (`depth_head.*`) go through the same table. Every shape is checked and every target
must be filled: all problems are collected and reported together in one `KeyMapError`.

Kinds:
  linear          torch Linear weight (out, in)           <-> kernel (in, out)
  patch           Conv3d weight (D, C, T, P, P)           <-> kernel (C*T*P*P, D) (a linear map of the flat patch)
  conv            Conv2d weight OIHW                      <-> kernel HWIO
  conv_transpose  ConvTranspose2d weight (I, O, kh, kw)   <-> kernel (kh, kw, I, O)
  norm            LayerNorm / RMSNorm weight              <-> scale
  bias            any bias                                <-> bias
  table           embedding tables                        <-> the array itself

Depth-head keys (the authors' checkpoint names), one to one with our tree under `depth_head/`:
  norm.{weight,bias}                            norm/{scale,bias}
  projects.i.{weight,bias}                      projects_i/{kernel,bias}               1x1 conv
  resize_layers.i.{weight,bias}  (i < 3)        resize_layers_i/{kernel,bias}          ConvTranspose k=s
  scratch.layerN_rn.weight                      scratch/layerN_rn/kernel               3x3, no bias
  scratch.refinenetN.resConfUnitK.convJ.*       scratch/refinenetN/resConfUnitK/convJ/...
  scratch.refinenetN.out_conv.*                 scratch/refinenetN/out_conv/...
  scratch.output_conv1.*                        scratch/output_conv1/...
  scratch.output_conv2.0.*, .2.*                scratch/output_conv2_0/..., output_conv2_2/...
  MLP head: norm.*, mlp.0.*, mlp.2.*            norm, mlp_0, mlp_2  (torch Linear)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from depthvlm_jax.model.config import Qwen3VLConfig

_HEAD_CONV = (r"projects\.[0-3]|scratch\.(layer[1-4]_rn|refinenet[1-4]\.(resConfUnit[12]\.conv[12]|out_conv)|"
              r"output_conv1|output_conv2\.[02])")
# First match wins; a key that matches no rule is unexpected, never guessed.
_RULES: list[tuple[re.Pattern, str]] = [(re.compile(p), k) for p, k in [
    (r"^model\.visual\.patch_embed\.proj\.weight$", "patch"),
    (r"^model\.visual\.pos_embed\.weight$", "table"),
    (r"^model\.language_model\.embed_tokens\.weight$", "table"),
    (r"^depth_head\.resize_layers\.[0-2]\.weight$", "conv_transpose"),
    (r"^depth_head\.mlp\.[02]\.weight$", "linear"),
    (rf"^depth_head\.({_HEAD_CONV})\.weight$", "conv"),
    (r"\.(norm\d?|q_norm|k_norm|input_layernorm|post_attention_layernorm)\.weight$", "norm"),
    (r"\.bias$", "bias"),
    (r"^(model\.|lm_head\.).*\.?weight$", "linear"),
]]

_PREFIXES = ("model.visual.", "model.language_model.", "lm_head.", "depth_head.")
# Module lists whose torch index `name.N` is the Flax module `name_N`.
_INDEXED = r"blocks|layers|deepstack_merger_list|projects|resize_layers|mlp|output_conv2"


class KeyMapError(ValueError):
  """Checkpoint keys or shapes that do not match the model; lists every offending key."""


def raise_if_mismatched(what: str, unexpected: list[str], mismatched: list[str], missing: list[str]) -> None:
  """Raises one `KeyMapError` naming every unexpected key, shape mismatch and unfilled parameter."""
  lines = []
  if unexpected:
    lines.append(f"{len(unexpected)} unexpected checkpoint keys: {sorted(unexpected)}")
  if mismatched:
    lines.append(f"{len(mismatched)} shape mismatches: {mismatched}")
  if missing:
    lines.append(f"{len(missing)} model parameters not in the checkpoint: {sorted(missing)}")
  if lines:
    raise KeyMapError(f"{what}:\n  " + "\n  ".join(lines))


def _kind(hf_key: str) -> str:
  for pattern, kind in _RULES:
    if pattern.search(hf_key):
      return kind
  raise KeyError(hf_key)


def hf_key_to_path(hf_key: str) -> tuple[tuple[str, ...], str]:
  """HF key -> (Flax param path, kind); KeyError for a key no rule covers."""
  kind = _kind(hf_key)
  key = hf_key[len("model."):] if hf_key.startswith("model.") else hf_key
  key = re.sub(r"\.(\d+)(?=\.)", r"_\1", key)
  parts = key.split(".")
  last = parts.pop()
  if hf_key == "model.visual.patch_embed.proj.weight":
    parts = ["visual", "patch_embed", "kernel"]
  elif hf_key.startswith("model.visual.patch_embed.proj."):
    parts = ["visual", "patch_embed", last]
  elif kind == "table":
    pass  # visual/pos_embed, language_model/embed_tokens are parameters themselves
  elif kind == "norm":
    parts.append("scale")
  elif kind in ("linear", "conv", "conv_transpose"):
    parts.append("kernel")
  else:
    parts.append(last)
  return tuple(parts), kind


def _to_numpy(t: Any) -> np.ndarray:
  if hasattr(t, "detach"):  # torch tensor (bf16 has no numpy dtype: go through float32)
    t = t.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      t = t.float()
    return t.numpy()
  return np.asarray(t)


def _to_flax(kind: str, t: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return t.T
  if kind == "patch":
    return t.reshape(t.shape[0], -1).T
  if kind == "conv":
    return t.transpose(2, 3, 1, 0)
  if kind == "conv_transpose":
    return t.transpose(2, 3, 0, 1)
  return t


def _to_torch(kind: str, a: np.ndarray, config: Qwen3VLConfig | None) -> np.ndarray:
  if kind == "linear":
    return a.T
  if kind == "patch":
    v = config.vision
    return a.T.reshape(a.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  if kind == "conv":
    return a.transpose(3, 2, 0, 1)
  if kind == "conv_transpose":
    return a.transpose(2, 3, 0, 1)
  return a


def hf_to_params(tensors: Iterable[tuple[str, Any]], config: Qwen3VLConfig | None, expected: Mapping[str, Any],
                 place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
                 other_prefixes: tuple[str, ...] = (), what: str = "checkpoint does not match the model",
                 ) -> dict[str, Any]:
  """Converts (HF key, tensor) pairs into our parameter tree, checking against `expected`.

  Args:
    tensors: iterable of (key, array-like: NumPy or torch); consumed one at a time (streaming), so
      each tensor is read once.
    config: model config (for the tied-embedding rule); None when there is no backbone.
    expected: parameter tree of shape/dtype structs (e.g. `layers.abstract_params`) to fill; which
      of `visual`, `language_model`, `lm_head`, `depth_head` it holds decides what is loaded.
    place: optional (path, np.ndarray) -> array hook (dtype cast, device placement, sharding).
    other_prefixes: key prefixes handled elsewhere (e.g. "depth_head." when loading the backbone
      alone): silently skipped.
    what: first line of the error message.

  Raises:
    KeyMapError: listing unexpected keys, shape mismatches and unfilled targets together.
  """
  want = traverse_util.flatten_dict(nn.unbox(expected))
  got: dict[tuple[str, ...], Any] = {}
  unexpected, mismatched = [], []
  for key, tensor in tensors:
    if key.startswith(other_prefixes):
      continue
    if key == "lm_head.weight" and config is not None and config.tie_word_embeddings:
      continue  # tied: the LM head is the embedding table
    if not key.startswith(_PREFIXES):
      unexpected.append(key)
      continue
    try:
      path, kind = hf_key_to_path(key)
    except KeyError:
      unexpected.append(key)
      continue
    if path not in want:
      unexpected.append(key)
      continue
    t = _to_numpy(tensor)
    arr = _to_flax(kind, t)
    if tuple(arr.shape) != tuple(want[path].shape):
      mismatched.append(f"{key}: checkpoint {tuple(t.shape)} -> {tuple(arr.shape)}, "
                        f"model expects {tuple(want[path].shape)} at {'/'.join(path)}")
      continue
    got[path] = place(path, arr) if place else arr
  missing = [f"{path_to_hf_key(p)} ({'/'.join(p)})" for p in want if p not in got]
  raise_if_mismatched(what, unexpected, mismatched, missing)
  return traverse_util.unflatten_dict(got)


def params_to_hf(params: Mapping[str, Any], config: Qwen3VLConfig | None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF key, torch-layout np.ndarray) for every parameter (backbone and depth head)."""
  for path, value in traverse_util.flatten_dict(nn.unbox(params)).items():
    key = path_to_hf_key(path)
    _, kind = hf_key_to_path(key)
    yield key, np.ascontiguousarray(_to_torch(kind, np.asarray(value), config))


def path_to_hf_key(path: tuple[str, ...]) -> str:
  """Inverse of `hf_key_to_path`."""
  parts = [re.sub(rf"^({_INDEXED})_(\d+)$", r"\1.\2", p) for p in path]
  if path == ("visual", "patch_embed", "kernel"):
    return "model.visual.patch_embed.proj.weight"
  if path == ("visual", "patch_embed", "bias"):
    return "model.visual.patch_embed.proj.bias"
  if path in (("visual", "pos_embed"), ("language_model", "embed_tokens")):
    return "model." + ".".join(parts) + ".weight"
  last = parts.pop()
  suffix = "bias" if last == "bias" else "weight"
  prefix = "" if path[0] in ("lm_head", "depth_head") else "model."
  return prefix + ".".join(parts + [suffix])


# ----------------------------------------------------------------------------- the depth head alone
def depth_head_key_map(params: Mapping[str, Any], prefix: str = "depth_head.") -> dict[str, tuple[tuple[str, ...], str]]:
  """{official key: (Flax path inside the head, kind)} for every leaf of a head parameter tree."""
  out = {}
  for path in traverse_util.flatten_dict(nn.unbox(params)):
    key = path_to_hf_key(("depth_head",) + path)
    try:
      mapped, kind = hf_key_to_path(key)
    except KeyError:
      mapped, kind = None, None
    if mapped != ("depth_head",) + path:
      raise KeyMapError(f"Flax parameter {'/'.join(path)} has no official depth-head key (got {key!r})")
    out[prefix + key[len("depth_head."):]] = (path, kind)
  return out


def depth_head_to_params(state_dict: Mapping[str, Any] | Iterable[tuple[str, Any]], expected: Any, *,
                         prefix: str = "depth_head.", ignore_other_keys: bool = False,
                         place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None) -> dict[str, Any]:
  """Official depth-head tensors -> the head's Flax tree (cast to `expected`'s dtypes).

  Args:
    state_dict: mapping or iterable of (key, tensor); torch tensors or NumPy arrays.
    expected: the head's tree of arrays / ShapeDtypeStructs (`layers.abstract_params` of the head).
    prefix: key prefix of the head ("depth_head." in the full checkpoint, "" for a bare head).
    ignore_other_keys: skip keys outside `prefix` (a full-model checkpoint) instead of reporting them.
    place: optional (path inside the head, np.ndarray) -> array hook; default: a jax array.
  """
  items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
  renamed = (("depth_head." + k[len(prefix):] if k.startswith(prefix) else
              (None if ignore_other_keys else k), v) for k, v in items)
  want = traverse_util.flatten_dict(nn.unbox(expected))
  cast = lambda path, arr: np.asarray(arr).astype(want[path[1:]].dtype)
  hook = ((lambda path, arr: place(path[1:], cast(path, arr))) if place else
          (lambda path, arr: jnp.asarray(cast(path, arr))))
  tree = hf_to_params(((k, v) for k, v in renamed if k is not None), None, {"depth_head": expected}, hook,
                      what="depth-head state dict does not match the model")
  return tree.get("depth_head", {})


def depth_head_to_torch(params: Mapping[str, Any], prefix: str = "depth_head.") -> dict[str, np.ndarray]:
  """The head's Flax tree -> {official key: NumPy array in torch layout} (exact inverse)."""
  return {prefix + k[len("depth_head."):]: v for k, v in params_to_hf({"depth_head": params}, None)}
