"""LoRA adapters on the model's linear layers, through `qwix`.

`with_lora(model, rank, alpha, targets)` returns a copy of the model whose forward adds
`(alpha / rank) * x @ A @ B` to every `Dense` whose module path ("language_model/layers_0/self_attn/q_proj")
the regex `targets` matches in full. The adapters are ordinary parameters beside the kernel:
`<module>/kernel_lora_a` (in, rank), initialised He-uniform, and `<module>/kernel_lora_b` (rank, out),
initialised to zero, so a fresh adapter leaves the model's output unchanged. `merge_adapters` folds
them into the kernels (`kernel + alpha / rank * A @ B`) and drops them: the plain model then gives the
adapted model's outputs, and the tree is the usual Hugging Face layout.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import qwix
from flax.traverse_util import flatten_dict, unflatten_dict

# The LLM's attention and MLP projections.
DEFAULT_TARGETS = r"language_model/layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# The model methods the adapters apply in (everything the train step, evaluation and generation call).
METHODS = ("__call__", "logits")


def with_lora(model, rank: int, alpha: float, targets: str = DEFAULT_TARGETS):
  """A copy of the linen `model` whose matched linear layers carry rank-`rank` adapters."""
  if rank <= 0:
    raise ValueError(f"LoRA rank={rank}: expected a positive integer")
  provider = qwix.LoraProvider(module_path=targets, rank=int(rank), alpha=float(alpha))
  return qwix.apply_lora_to_model(model, provider, methods=METHODS)


def is_adapter(path: tuple[str, ...]) -> bool:
  """Whether the flat parameter path names a LoRA adapter matrix."""
  return path[-1].endswith(ADAPTER_SUFFIXES)


def adapter_modules(params: Mapping[str, Any]) -> list[str]:
  """'/'-joined module paths that hold adapters, in tree order."""
  seen = {}
  for path in flatten_dict(params):
    if is_adapter(path):
      seen["/".join(path[:-1])] = None
  return list(seen)


def linear_modules(params: Mapping[str, Any]) -> list[str]:
  """'/'-joined module paths of the model's linear layers (modules with a 2-D `kernel`), the names
  `train.lora_targets` is matched against."""
  return ["/".join(path[:-1]) for path, x in flatten_dict(params).items()
          if path[-1] == "kernel" and len(x.shape) == 2]


def uneven_scanned_adapters(params: Mapping[str, Any]) -> list[str]:
  """Repeated blocks (text layers, vision blocks) whose adapters differ from another block of the
  same tower, as "tower/block" names. A scanned run (`model.scan_layers`) needs them all alike."""
  by_block: dict[str, dict[str, frozenset]] = {}
  for path in flatten_dict(params):
    s = "/".join(path)
    m = re.match(r"(language_model/layers|visual/blocks)_(\d+)/(.*)", s)
    if m:
      by_block.setdefault(m[1], {}).setdefault(m[2], set()).add(m[3])
  out = []
  for tower, blocks in by_block.items():
    kinds = {k: frozenset(x for x in v if x.endswith(ADAPTER_SUFFIXES)) for k, v in blocks.items()}
    if len(set(kinds.values())) > 1:
      out += [f"{tower}_{k}" for k, v in kinds.items() if v != kinds[min(kinds, key=int)]]
  return out


def split_adapters(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(tree without the adapters, the adapters alone)."""
  flat = flatten_dict(tree)
  return (unflatten_dict({p: x for p, x in flat.items() if not is_adapter(p)}),
          unflatten_dict({p: x for p, x in flat.items() if is_adapter(p)}))


def init_adapters(like: Mapping[str, Any], rng: jax.Array) -> dict[str, Any]:
  """Fresh adapters for the ShapeDtypeStructs `like` (adapter leaves only), as qwix initialises
  them: A He-uniform (`jax.nn.initializers.he_uniform`, qwix's default), B zero; each created on
  its sharding. For runs whose other weights come from a checkpoint or a Hugging Face directory."""
  flat = flatten_dict(like)
  keys = dict(zip(flat, jax.random.split(rng, max(len(flat), 1))))

  def make(path, s):
    init = jax.nn.initializers.he_uniform() if path[-1].endswith("_lora_a") else jax.nn.initializers.zeros
    return jax.jit(lambda k: init(k, s.shape, s.dtype), out_shardings=getattr(s, "sharding", None))(keys[path])

  return unflatten_dict({p: make(p, s) for p, s in flat.items()})


def merge_adapters(params: Mapping[str, Any], rank: int, alpha: float) -> dict[str, Any]:
  """The tree with every adapted kernel replaced by `kernel + alpha / rank * A @ B` (computed in
  float32, stored in the kernel's dtype) and the adapter matrices removed."""
  flat = flatten_dict(params)
  scale = float(alpha) / int(rank)
  out = {}
  for path, x in flat.items():
    if is_adapter(path):
      continue
    a = flat.get(path[:-1] + (path[-1] + "_lora_a",))
    if a is not None:
      b = flat[path[:-1] + (path[-1] + "_lora_b",)]
      delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
      merged = (jnp.asarray(x, jnp.float32) + scale * delta).astype(x.dtype)
      x = jax.device_put(merged, x.sharding) if isinstance(x, jax.Array) else merged
    out[path] = x
  return unflatten_dict(out)
