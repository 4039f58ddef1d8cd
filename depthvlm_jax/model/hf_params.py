"""One explicit key map between the HF Qwen3-VL state dict and our Flax parameter tree.

A table of (regex over the HF key, kind) decides how each tensor is transformed; the Flax path is
the HF key with the `model.` prefix dropped, `name.N` turned into `name_N` and the final
`weight` renamed by kind. Every shape is checked and every target must be filled: all problems are
collected and reported together in one `KeyMapError`.

Kinds:
  linear     torch Linear weight (out, in)  <-> kernel (in, out)
  patch      Conv3d weight (D, C, T, P, P)  <-> kernel (C*T*P*P, D) (a linear map of the flat patch)
  norm       LayerNorm / RMSNorm weight      <-> scale
  bias       any bias                        <-> bias
  table      embedding tables                <-> the array itself
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from depthvlm_jax.model.config import Qwen3VLConfig

_RULES: list[tuple[re.Pattern, str]] = [(re.compile(p), k) for p, k in [
    (r"^model\.visual\.patch_embed\.proj\.weight$", "patch"),
    (r"^model\.visual\.pos_embed\.weight$", "table"),
    (r"^model\.language_model\.embed_tokens\.weight$", "table"),
    (r"\.(norm\d?|q_norm|k_norm|input_layernorm|post_attention_layernorm)\.weight$", "norm"),
    (r"\.bias$", "bias"),
    (r"^(model\.|lm_head\.).*\.?weight$", "linear"),
]]

_BACKBONE_PREFIXES = ("model.visual.", "model.language_model.", "lm_head.")


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
  """HF key -> (Flax param path, kind)."""
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
  elif kind == "linear":
    parts.append("kernel")
  else:
    parts.append(last)
  return tuple(parts), kind


def _to_flax(kind: str, t: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return t.T
  if kind == "patch":
    return t.reshape(t.shape[0], -1).T
  return t


def _to_torch(kind: str, a: np.ndarray, config: Qwen3VLConfig) -> np.ndarray:
  if kind == "linear":
    return a.T
  if kind == "patch":
    v = config.vision
    return a.T.reshape(a.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  return a


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def hf_to_params(tensors: Iterable[tuple[str, Any]], config: Qwen3VLConfig, expected: Mapping[str, Any],
                 place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
                 other_prefixes: tuple[str, ...] = ()) -> dict[str, Any]:
  """Converts (HF key, tensor) pairs into our parameter tree, checking against `expected`.

  Args:
    tensors: iterable of (key, array-like); consumed one at a time (streaming).
    config: model config (for the tied-embedding rule).
    expected: parameter tree of shape/dtype structs (e.g. from `jax.eval_shape`) to fill.
    place: optional (path, np.ndarray) -> array hook (dtype cast, device placement, sharding).
    other_prefixes: key prefixes owned by another table (e.g. "depth_head."): silently skipped.

  Raises:
    KeyMapError: listing unexpected keys, shape mismatches and unfilled targets together.
  """
  want = {p: s for p, s in flatten(expected).items()}
  got: dict[tuple[str, ...], Any] = {}
  unexpected, mismatched = [], []
  for key, tensor in tensors:
    if key.startswith(other_prefixes):
      continue
    if key == "lm_head.weight" and config.tie_word_embeddings:
      continue  # tied: the LM head is the embedding table
    if not key.startswith(_BACKBONE_PREFIXES):
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
    arr = _to_flax(kind, np.asarray(tensor))
    if tuple(arr.shape) != tuple(want[path].shape):
      mismatched.append(f"{key}: checkpoint {tuple(np.asarray(tensor).shape)} -> {tuple(arr.shape)}, "
                        f"model expects {tuple(want[path].shape)} at {'/'.join(path)}")
      continue
    got[path] = place(path, arr) if place else arr
  missing = ["/".join(p) for p in want if p not in got]
  raise_if_mismatched("checkpoint does not match the Qwen3-VL config", unexpected, mismatched, missing)
  return unflatten(got)


def params_to_hf(params: Mapping[str, Any], config: Qwen3VLConfig) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF key, torch-layout np.ndarray) for every backbone parameter."""
  for path, value in flatten(params).items():
    key = path_to_hf_key(path)
    _, kind = hf_key_to_path(key)
    yield key, _to_torch(kind, np.asarray(value), config)


def path_to_hf_key(path: tuple[str, ...]) -> str:
  """Inverse of `hf_key_to_path`."""
  parts = [re.sub(r"^(blocks|layers|deepstack_merger_list)_(\d+)$", r"\1.\2", p) for p in path]
  if path == ("visual", "patch_embed", "kernel"):
    return "model.visual.patch_embed.proj.weight"
  if path == ("visual", "patch_embed", "bias"):
    return "model.visual.patch_embed.proj.bias"
  if path in (("visual", "pos_embed"), ("language_model", "embed_tokens")):
    return "model." + ".".join(parts) + ".weight"
  last = parts.pop()
  suffix = "bias" if last == "bias" else "weight"
  prefix = "" if path[0] == "lm_head" else "model."
  return prefix + ".".join(parts + [suffix])
