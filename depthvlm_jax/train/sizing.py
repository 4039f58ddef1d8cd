"""How a run spreads its global batch over the devices it has: mesh, rows per device, micro-batches.

The global batch is the recipe and is never changed. From it, the devices (count, slices, memory)
and `train.per_device_rows`:

  "0"     `train.micro_batches` and `mesh` as the config gives them;
  N       the mesh derived (`derive`), and the fewest micro-batches whose rows per device are at most N;
  "auto"  the same mesh, and the largest rows per device whose compiled train step stays within
          `train.memory_fraction` of the device memory (`search_rows`, compiling ahead of time
          before any data is read). The choice is kept in `<workdir>/sizing.json`: a restart on the
          same devices with the same model and batch reads it instead of searching again.

The mesh: the batch over every device (a tensor-parallel axis of 2, 4 or 8 only when the batch does
not split over all of them), the data-parallel axis over the slices' network, and per stage FSDP or
data parallelism from the memory the train state needs: data parallel (every device holds the whole
state, and only the trainable gradients are reduced) when the state takes at most `DP_SHARE` of the
planned memory, FSDP otherwise.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from etils import epath

from depthvlm_jax import presets, sharding
from depthvlm_jax.runs import freeze
from depthvlm_jax.runs.model_from_config import params_like
from depthvlm_jax.train import distributed, optim
from depthvlm_jax.train.data import batch_names, example_specs
from depthvlm_jax.train.run_record import write_atomic

log = logging.getLogger(__name__)
GiB = 2**30
DP_SHARE = 0.5  # data parallel when the whole train state takes at most this share of the planned memory
TENSOR_SIZES = (1, 2, 4, 8)  # tensor-parallel sizes the derivation may use to split the batch
CACHE_FILE = "sizing.json"


class SizingError(ValueError):
  """The batch cannot be split over the devices, or the run cannot fit them."""


@dataclasses.dataclass(frozen=True)
class Plan:
  global_batch: int
  devices: int
  mesh: dict[str, int]  # data, fsdp, tensor
  per_device_rows: int  # rows one device takes per micro-batch
  micro_batches: int
  slices: int = 1
  device_kind: str = ""
  memory_bytes: float | None = None  # per-device memory planned with
  peak_bytes: float | None = None  # per-device peak of the compiled step (the largest bucket), when known
  how: str = "config"  # config | rows | auto | auto (cached)

  def line(self) -> str:
    """The one-line plan a run logs at start-up."""
    mesh = " ".join(f"{a}={self.mesh[a]}" for a in sharding.MESH_AXES)
    slices = f", {self.slices} slices" if self.slices > 1 else ""
    if self.peak_bytes is not None and self.memory_bytes:
      peak = f"; peak {self.peak_bytes / GiB:.2f} of {self.memory_bytes / GiB:.2f} GiB per device"
    elif self.peak_bytes is not None:
      peak = f"; peak {self.peak_bytes / GiB:.2f} GiB per device"
    else:
      peak = ""
    return (f"plan: {self.devices} x {self.device_kind or 'device'}{slices}; mesh {mesh}; "
            f"{self.per_device_rows} rows per device x {self.micro_batches} micro-batches x "
            f"{self.global_batch // (self.per_device_rows * self.micro_batches)} batch shards = global batch "
            f"{self.global_batch}{peak} ({self.how})")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def parse_rows(value) -> int | str:
  """`train.per_device_rows` as 0, a positive int or "auto"."""
  text = str(value).strip().lower()
  if text == "auto":
    return "auto"
  n = int(text) if text.isdigit() else -1
  if n < 0:
    raise SizingError(f"train.per_device_rows={value!r}: expected 0 (train.micro_batches and mesh as given), "
                      "a positive number of rows, or 'auto'")
  return n


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def nearest_batches(global_batch: int, multiple: int) -> list[int]:
  """The multiples of `multiple` just below and above `global_batch` (no zero)."""
  lo = global_batch // multiple * multiple
  return [b for b in (lo, lo + multiple) if b > 0]


def batch_shards(global_batch: int, devices: int, slices: int = 1, tensor: int = 0) -> tuple[int, int]:
  """(batch shards, tensor-parallel size): the batch over every device when it splits, else over
  devices / t for the smallest t of `TENSOR_SIZES` dividing a slice (or the `tensor` given)."""
  per_slice = devices // slices
  options = [tensor] if tensor > 1 else [t for t in TENSOR_SIZES if per_slice % t == 0]
  if tensor > 1 and per_slice % tensor:
    raise SizingError(f"mesh.tensor={tensor} does not divide the {per_slice} devices of a slice")
  for t in options:
    if global_batch % (devices // t) == 0:
      return devices // t, t
  shards = devices // options[-1]
  raise SizingError(f"train.global_batch={global_batch} does not split over {devices} devices (at most "
                    f"{options[-1]}-way tensor parallelism leaves {shards} batch shards): the nearest global "
                    f"batches that do are {' and '.join(map(str, nearest_batches(global_batch, shards)))}")


def rows_options(global_batch: int, shards: int) -> list[tuple[int, int]]:
  """Every (rows per device, micro-batches) that splits the batch over `shards`, most rows first."""
  total = global_batch // shards
  return [(total // k, k) for k in _divisors(total)]


IN_FLIGHT = 2  # micro-batches a device holds at once: the one running and the next, being transferred


def derive(global_batch: int, rows: int, devices: int, *, slices: int = 1, tensor: int = 0,
           memory_bytes: float | None = None, memory_fraction: float = 0.85, state_bytes: float | None = None,
           row_bytes: float = 0, device_kind: str = "", how: str = "rows") -> Plan:
  """The plan for `devices` taking at most `rows` rows each per micro-batch (a pure function).

  row_bytes: bytes of one row of the train batch (the largest bucket). The trainer sends one
  micro-batch at a time, so a device holds `IN_FLIGHT` micro-batches of its rows, not the whole batch.
  Raises SizingError naming the nearest global batches that split when this one does not, and when
  the train state fully sharded plus two micro-batches of one row exceed `memory_fraction` of the
  device memory, whatever the rows per micro-batch.
  """
  if global_batch <= 0 or devices <= 0 or devices % slices:
    raise SizingError(f"train.global_batch={global_batch} over {devices} devices in {slices} slices: "
                      "expected positive numbers, devices a multiple of slices")
  shards, tensor = batch_shards(global_batch, devices, slices, tensor)
  per_device, k = next((r, k) for r, k in rows_options(global_batch, shards) if r <= max(rows, 1))
  data_parallel = False
  if memory_bytes and state_bytes is not None:
    budget = memory_fraction * memory_bytes
    least = IN_FLIGHT * row_bytes  # one row per device
    if state_bytes / devices + least > budget:
      need = f"at least {math.ceil(state_bytes / (budget - least))}" if budget > least else "more memory per"
      raise SizingError(
          f"the train state needs {state_bytes / GiB:.1f} GiB, {state_bytes / devices / GiB:.1f} GiB per device "
          f"over {devices} devices, and {IN_FLIGHT} micro-batches of one row {least / GiB:.2f} GiB: more than "
          f"{memory_fraction:.0%} of the {memory_bytes / GiB:.1f} GiB each has, at any row count: it needs {need} "
          "such devices")
    data_parallel = state_bytes + IN_FLIGHT * row_bytes * per_device <= DP_SHARE * budget
  mesh = ({"data": shards, "fsdp": 1, "tensor": tensor} if data_parallel
          else {"data": slices, "fsdp": shards // slices, "tensor": tensor})
  return Plan(global_batch, devices, mesh, per_device, k, slices, device_kind, memory_bytes, None, how)


def with_rows(plan: Plan, rows: int, k: int, peak: float | None = None, how: str | None = None) -> Plan:
  return dataclasses.replace(plan, per_device_rows=rows, micro_batches=k, peak_bytes=peak, how=how or plan.how)


def chip_name(device_kind: str) -> str:
  """The `presets.ROWS_PER_DEVICE` key of a JAX `device_kind` ("TPU v5 lite" -> "v5e"), or ""."""
  kind = device_kind.lower()
  for needle, name in (("v5 lite", "v5e"), ("v5e", "v5e"), ("v6 lite", "v6e"), ("v6e", "v6e"), ("v5p", "v5p"),
                       ("tpu v5", "v5p"), ("tpu v4", "v4"), ("h100", "h100")):
    if needle in kind:
      return name
  return ""


def device_memory(device) -> float | None:
  """The memory the runtime gives one device (bytes), or None (the CPU and compile-only devices)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 -- backends without memory statistics
    return None
  return float(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def state_bytes(config, model, devices: Sequence[Any]) -> int:
  """Bytes of the whole train state: frozen and trainable parameters, and the optimizer's moments."""
  like, mask = params_like(config, model, sharding.make_mesh({}, list(devices)[:1]))
  trainable, frozen = freeze.split_params(like, mask)
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(1e-3, 1000, 0.0), 1.0, 0.0)
  opt = jax.eval_shape(optimizer.init, trainable)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((trainable, frozen, opt)))


def plan_for(config, devices: Sequence[Any], model=None, memory_bytes: float | None = None) -> Plan:
  """The plan of `config` on `devices` without compiling anything.

  memory_bytes: per-device memory (default: `train.memory_budget_gib`, else what the device reports).
  With "auto" the rows are the preset's for this chip (`presets.ROWS_PER_DEVICE`), else every row a
  device gets: `search_rows` settles them. "auto" without any memory figure (the CPU without
  `train.memory_budget_gib`) keeps `train.micro_batches` and `mesh` as given.
  """
  devices = list(devices)
  t = config.train
  rows = parse_rows(t.per_device_rows)
  kind = devices[0].device_kind
  memory = memory_bytes or (t.memory_budget_gib * GiB if t.memory_budget_gib else device_memory(devices[0]))
  slices = sharding.slice_count(devices)
  if rows == 0 or (rows == "auto" and not memory):
    try:
      mesh = sharding.make_mesh(dict(config.mesh), devices)
    except ValueError as e:
      raise SizingError(f"mesh={dict(config.mesh)}: {e}") from None
    sharding.check_batch_divides(mesh, t.global_batch, t.micro_batches)
    shards = sharding.batch_shards(mesh)
    return Plan(t.global_batch, len(devices), dict(mesh.shape), t.global_batch // (shards * t.micro_batches),
                t.micro_batches, slices, kind, memory, None,
                "config" if rows == 0 else "config: no device memory figure for 'auto', set train.memory_budget_gib")
  from depthvlm_jax.runs.model_from_config import build_model
  model = model or build_model(config)
  state = state_bytes(config, model, devices)
  largest = max(example_specs(config, model.config), key=lambda sp: sp.image_size[0] * sp.image_size[1])
  row = sum(math.prod(shape) * np.dtype(dtype).itemsize
            for shape, dtype in largest.batch_shapes(model.config, 1).values())
  hint = rows if rows != "auto" else presets.ROWS_PER_DEVICE.get((config.model.size, config.stage), {}).get(
      chip_name(kind), t.global_batch)
  return derive(t.global_batch, hint, len(devices), slices=slices, tensor=int(config.mesh.tensor),
                memory_bytes=memory, memory_fraction=t.memory_fraction, state_bytes=state, row_bytes=row, device_kind=kind,
                how="auto" if rows == "auto" else "rows")


def with_plan(config, plan: Plan):
  """A copy of `config` whose `mesh` and `train.micro_batches` are the plan's."""
  c = config.copy_and_resolve_references()
  c.train.micro_batches = plan.micro_batches
  for axis, size in plan.mesh.items():
    c.mesh[axis] = size
  return c


def search_rows(plan: Plan, peak_of: Callable[[Plan], float | None], budget: float) -> tuple[Plan, dict[int, Any]]:
  """The plan with the most rows per device whose `peak_of` (per-device bytes; None = the compiler
  refused it) is within `budget`, by bisection over the rows that split the batch (peaks grow with
  rows), starting at the plan's own rows. Returns it and {rows: peak} of every compile made."""
  shards = plan.global_batch // (plan.per_device_rows * plan.micro_batches)
  options = rows_options(plan.global_batch, shards)[::-1]  # fewest rows first
  peaks: dict[int, Any] = {}

  def fits(i: int) -> bool:
    rows, k = options[i]
    peaks[rows] = peak_of(with_rows(plan, rows, k))
    return peaks[rows] is not None and peaks[rows] <= budget

  lo, hi = -1, len(options)  # options[lo] fits (or lo = -1), options[hi] does not (or hi = len)
  probe = max(i for i, (r, _) in enumerate(options) if r <= max(plan.per_device_rows, 1))
  while hi - lo > 1:
    if fits(probe):
      lo = probe
    else:
      hi = probe
    probe = (lo + hi) // 2
  if lo < 0:
    raise SizingError(f"{plan.devices} x {plan.device_kind}: even 1 row per device needs "
                      f"{_gib(peaks.get(1))} per device, over the budget of {budget / GiB:.2f} GiB "
                      f"(train.memory_fraction of the device memory): use more devices")
  rows, k = options[lo]
  return with_rows(plan, rows, k, peaks[rows], "auto"), peaks


def _gib(x) -> str:
  return "more than the device has (the compiler refused it)" if x is None else f"{x / GiB:.2f} GiB"


# ---- compiling the train step ahead of time
def batch_like(spec, model_config, global_batch: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """A global train batch (or micro-batch) of `global_batch` rows of bucket `spec` as
  `data.to_global` lays it out, abstract and sharded."""
  out = {}
  for k, (shape, dtype) in spec.batch_shapes(model_config, global_batch).items():
    if k == "position_ids":
      shape = (shape[1], shape[0]) + shape[2:]  # (B, 3, L) -> (3, B, L)
    out[k] = jax.ShapeDtypeStruct(shape, dtype,
                                  sharding=sharding.activation_sharding(mesh, *batch_names(k), shape=shape))
  return out


def counts_like(global_batch: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The per-row loss denominators of a global batch (`step.row_counts` through `data.to_global`), abstract."""
  sh = sharding.activation_sharding(mesh, "batch", shape=(global_batch,))
  return {k: jax.ShapeDtypeStruct((global_batch,), np.int32, sharding=sh) for k in ("depth", "lm")}


def peak_bytes(compiled) -> float:
  """Per-device peak of a compiled program: arguments + outputs - donated aliases + temporaries."""
  m = compiled.memory_analysis()
  return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def programs_peak_bytes(programs) -> float:
  """Per-device peak of one update (`model_state.TrainPrograms`, compiled): the larger of `accumulate`
  with the next micro-batch arriving (its bytes once more) and `apply`."""
  return max(peak_bytes(programs.accumulate) + programs.micro_bytes, peak_bytes(programs.apply))


def compile_steps(config, model, optimizer, mesh, state, frozen, specs,
                  compiled: dict[tuple[int, int], Any] | None = None, apply=None) -> dict[tuple[int, int], Any]:
  """{(H, W): `model_state.TrainPrograms`, compiled} for every bucket, ahead of time (in threads: the
  compiler releases the GIL) on the state's and frozen params' own shardings; `state` and `frozen`
  may be concrete or abstract. `apply` is compiled once and shared by the buckets.

  compiled: {(H, W): compiled `accumulate`} already compiled for this config (the `auto` search's):
  not compiled again (`accumulate` does not depend on the optimizer, only `apply` does).
  apply: a compiled `apply` for this optimizer, not compiled again.
  """
  from depthvlm_jax.aot.compiling import shard_bytes
  from depthvlm_jax.train.model_state import accumulator_like, jit_train_programs
  px = model.config.vision.image_token_pixels
  acc = accumulator_like(state, mesh)
  compiled = compiled or {}
  k = config.train.micro_batches
  micro_rows = config.train.global_batch // k
  counts = counts_like(config.train.global_batch, mesh)

  def programs_of(spec, apply=None):
    h, w = spec.image_size
    return jit_train_programs(config, model, optimizer, mesh, state, (h // px, w // px), apply=apply)

  def one(spec):
    if tuple(spec.image_size) in compiled:
      return compiled[tuple(spec.image_size)]
    programs = programs_of(spec)
    micro = batch_like(spec, model.config, micro_rows, mesh)
    return programs.accumulate.lower(state, frozen, acc, micro, counts).compile()

  def apply_compiled():
    programs = programs_of(specs[0])
    return programs.apply.lower(state, frozen, acc).compile()

  workers = max(1, min(len(specs) + 1, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = pool.submit(apply_compiled) if apply is None else None
    accumulates = list(pool.map(one, specs))
    apply = apply if pending is None else pending.result()
  out = {}
  for spec, acc in zip(specs, accumulates):
    p = programs_of(spec, apply=apply)
    p.accumulate = acc
    p.micro_bytes = shard_bytes(batch_like(spec, model.config, micro_rows, mesh))
    out[tuple(spec.image_size)] = p
  return out


def _cache_key(config, plan: Plan) -> dict[str, Any]:
  """What the searched rows depend on: the devices, the memory planned with, the model and the batch."""
  c = config.to_dict()
  return json.loads(json.dumps({
      "devices": plan.devices, "device_kind": plan.device_kind, "slices": plan.slices, "mesh": plan.mesh,
      "memory_bytes": plan.memory_bytes, "stage": c["stage"], "model": c["model"],
      "data": {k: c["data"][k] for k in ("buckets", "seq_len", "text_tokens")},
      "train": {k: c["train"][k] for k in ("global_batch", "trainable", "lm_positions", "memory_fraction")},
  }, default=str))


def settle_auto(config, plan: Plan, model, mesh,
                workdir: epath.Path | None) -> tuple[Plan, dict[int, Any], dict[tuple[int, int], Any]]:
  """An "auto" plan's rows: from `<workdir>/sizing.json` when it was searched for the same devices,
  model and batch, else `search_rows` compiling the update of the largest bucket for `mesh`.

  Returns (plan, {rows: peak} of the compiles made, {(H, W): the compiled `accumulate` of the chosen
  plan} for `compile_steps` to reuse); both dicts empty when read from the file.
  """
  key = _cache_key(config, plan)
  path = workdir / CACHE_FILE if workdir is not None else None
  if path is not None and path.is_file():
    try:
      cached = json.loads(path.read_text())
    except ValueError:
      cached = {}
    if cached.get("key") == key:
      p = cached["plan"]
      return with_rows(plan, p["per_device_rows"], p["micro_batches"], p["peak_bytes"], "auto (cached)"), {}, {}
  specs = example_specs(config, model.config)
  largest = max(specs, key=lambda s: (s.image_size[0] * s.image_size[1], s.seq_len))
  # `accumulate` does not read the optimizer, and the optimizer state's shapes do not depend on the
  # schedule: the programs compiled here are the trainer's, whatever its learning rate and steps.
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(1e-3, 1000, 0.0), 1.0, 0.0)
  like, mask = params_like(config, model, mesh)
  trainable, frozen = freeze.split_params(like, mask)
  from depthvlm_jax.train.model_state import abstract_state
  state = abstract_state(optimizer, trainable, mesh)
  bucket = tuple(largest.image_size)
  made: dict[int, Any] = {}  # rows -> compiled programs
  apply: dict[str, Any] = {}  # compiled once: it does not depend on the rows

  def peak_of(candidate: Plan) -> float | None:
    c = with_plan(config, candidate)
    try:
      programs = compile_steps(c, model, optimizer, mesh, state, frozen, [largest], apply=apply.get("apply"))
    except Exception as e:  # noqa: BLE001 -- the compiler's out-of-memory refusal is a "does not fit"
      if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e) or "exceeds" in str(e):
        return None
      raise
    made[candidate.per_device_rows] = programs[bucket]
    apply["apply"] = programs[bucket].apply
    peak = programs_peak_bytes(programs[bucket])
    log.info("sizing: %d rows per device x %d micro-batches: peak %.2f GiB per device",
             candidate.per_device_rows, candidate.micro_batches, peak / GiB)
    return peak

  plan, peaks = search_rows(plan, peak_of, config.train.memory_fraction * plan.memory_bytes)
  if path is not None and distributed.is_main():
    write_atomic(path, json.dumps({"key": key, "plan": plan.to_json(), "peaks": peaks}, indent=1))
  return plan, peaks, {bucket: made[plan.per_device_rows].accumulate}


def enable_compile_cache(path: str) -> str | None:
  """Turns JAX's persistent compilation cache on at `path` ("~" expanded); "" leaves it off. A cache
  already chosen through the JAX_COMPILATION_CACHE_DIR environment variable is kept. Returns the
  folder in use, or None."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not path:
    return None
  folder = os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder
