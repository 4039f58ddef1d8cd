"""Compiling one program and reading its per-chip figures: memory (`memory_analysis()`, per-argument
bytes in the compiled layout), the compiler's cost model (`cost_analysis()`), and collectives."""

from __future__ import annotations

import math
import re
import time
from typing import Any, Callable

import numpy as np

from depthvlm_jax.aot.hlo_stats import collective_stats

GiB = 2**30
# The custom call of Pallas TPU kernels (Mosaic), which the TPU cost analysis does not cost.
UNCOSTED_CUSTOM_CALL = "tpu_custom_call"


def hbm_bytes(x, fmt) -> int:
  """Bytes one device holds for abstract array `x` (its shard) in the compiled layout `fmt`.

  TPU layouts tile the minor dimensions (e.g. f32 (8, 128)): a shard occupies its shape padded to
  whole tiles. The sum over a program's arguments equals `memory_analysis().argument_size_in_bytes`.
  """
  shape = list(x.sharding.shard_shape(x.shape))
  layout = fmt.layout
  dims = [shape[i] for i in layout.major_to_minor] if shape else [1]
  if layout.tiling:
    tile = layout.tiling[0]
    for j, t in enumerate(tile):
      k = len(dims) - len(tile) + j
      if k >= 0:
        dims[k] = -(-dims[k] // t) * t
  return math.prod(dims) * np.dtype(x.dtype).itemsize


def argument_bytes_by_group(compiled, groups: dict[str, Any]) -> dict[str, int]:
  """{group: per-device bytes} for the program's positional arguments, given as named groups in order."""
  import jax
  formats = compiled.input_formats[0]
  out = {}
  for (name, tree), fmt in zip(groups.items(), formats):
    out[name] = sum(hbm_bytes(x, f) for x, f in zip(jax.tree.leaves(tree), jax.tree.leaves(fmt)))
  return out


def _generic_cost(compiled) -> dict[str, float]:
  """FLOPs and bytes of the optimised per-device module by XLA's platform-neutral HloCostAnalysis
  (no time estimate: `est_step_s` is then the roofline)."""
  import jax
  from jax._src.lib import _jax
  try:
    module = compiled.runtime_executable().hlo_modules()[0]
    cost = dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))
  except Exception:  # noqa: BLE001 -- a private API: without it only the model FLOPs remain
    return {}
  cost.pop("optimal_seconds", None)
  return cost


def compile_stats(jitted, args: tuple, inspect: Callable | None = None) -> dict[str, Any]:
  """Lowers and compiles; returns memory/cost/collective figures or `fits: False` with the message.

  inspect: optional `compiled -> dict` whose entries are added to the figures.
  """
  t0 = time.time()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # noqa: BLE001 -- the compiler's refusal is the result, not a crash
    msg = " ".join(str(e).split())
    m = re.search(r"(RESOURCE_EXHAUSTED|Ran out of memory|exceeds)", msg)
    if not m:
      raise
    temp = re.search(r"HLO temporaries \(([\d.]+)G\)", msg)
    return {"fits": False, "error": msg[:600], "compile_s": round(time.time() - t0, 1),
            "temp_gib": float(temp.group(1)) * 1e9 / GiB if temp else None}
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost is None:  # the CUDA plugin has no cost model: XLA's generic HLO cost analysis instead
    cost = _generic_cost(compiled)
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  hlo = compiled.as_text()
  return {
      "fits": True, "error": None, "compile_s": round(compile_s, 1),
      "argument_gib": mem.argument_size_in_bytes / GiB, "output_gib": mem.output_size_in_bytes / GiB,
      "alias_gib": mem.alias_size_in_bytes / GiB, "temp_gib": mem.temp_size_in_bytes / GiB,
      "peak_gib": peak / GiB, "argument_bytes": int(mem.argument_size_in_bytes),
      "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "est_step_s": float(cost.get("optimal_seconds", 0.0)),
      "collectives": collective_stats(hlo),
      "uncosted_kernels": hlo.count(f'custom_call_target="{UNCOSTED_CUSTOM_CALL}"'),
      **(inspect(compiled) if inspect else {}),
  }


def shard_bytes(tree) -> int:
  """Per-device bytes of a tree of sharded abstract (or concrete) arrays, without layout padding."""
  import jax
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
