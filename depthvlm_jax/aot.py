"""Ahead-of-time compilation report: compile the exact train and inference programs for a TPU slice.

    python -m depthvlm_jax.aot --config=configs/stage1.py:paper_4b --topology=v5p:4x4x4 [--json OUT.json]
    python -m depthvlm_jax.aot --config=configs/stage2.py --topology=v5e:2x2 --config.train.global_batch=16
    python -m depthvlm_jax.aot --sweep [--sweep_out DIR] [--buckets=768x1024] [--memory_only]   # the plan table

Every program is compiled once per image bucket of `data.buckets` (the trainer compiles one step
per bucket), named `PROGRAM@HxW` (e.g. `train@768x1024`); `--buckets=768x1024,...` limits the
report to some of them. `--memory_only` compiles each train step once, for memory and collectives
(no cost probes, no time or MFU): a third of the compile time.

No TPU is needed: libtpu (the `tpu` extra, `pip install -e ".[tpu]"`) carries the real TPU compiler,
and `jax.experimental.topologies` describes the chips of a named slice ("v5p:4x4x4" = 64 chips on 16
hosts). Each program is lowered with abstract inputs that carry their final shardings on a mesh of
those chips and compiled; nothing is allocated.

Programs:
  train    `trainer.jit_train_step`: the trainer's own jitted, donated step (same model, rules,
           shardings, micro-batching) on a global batch laid out as the trainer lays it out;
  prefill  `generate.prefill` with the depth head for the bucket, one image per batch shard, the
           KV cache sized for `--max_new_tokens`;
  decode   one `generate.decode_step` on that cache.

Figures per program (all per chip):
  fits / error       whether the compiler accepted the program within HBM, else its message;
  *_gib              argument, output, temporary bytes from `memory_analysis()`; peak = arguments +
                     outputs - donated aliases + temporaries; hbm_gib is the chip's capacity;
  flops, bytes_accessed, est_step_s
                     the compiler's cost model (`cost_analysis()`, `optimal_seconds`). The cost model
                     counts a while-loop body once (measured: a scan of K micro-batches reports the
                     cost of one), so for a scanned train step the figures are corrected to
                     K x (step - update) + update, where `update` is `step.guarded_update` (everything
                     outside the micro-batch loop) compiled alone with the same shardings; with
                     `model.scan_layers` the layer loops inside are corrected first, from one
                     iteration's cost measured by two probe compiles (`_correct_layer_loops`).
                     est_step_s is at least the roofline (flops at peak, bytes at HBM bandwidth), plus
                     `uncosted_kernel_s` when the program calls Pallas kernels the cost model skips
                     (splash attention): their `attention_flops` at the chip's peak;
  model_flops, est_mfu
                     model FLOPs: every matmul and convolution of the program's jaxpr traced without
                     rematerialisation (scan bodies times their trip counts), per chip; MFU = model
                     FLOPs / (est_step_s x the chip's peak bf16 FLOP/s);
  images_per_s, est_hours
                     global batch / est_step_s, and the hours of one paper epoch (4.4M images);
  collectives        per kind (all-gather, all-reduce, reduce-scatter, all-to-all,
                     collective-permute): count and bytes per step from the optimised HLO, with
                     while-loop bodies multiplied by their trip counts.
Per report, `host`: its wall time and the host's peak resident memory.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import re
import resource
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

GiB = 2**30
PAPER_EPOCH_IMAGES = 4.4e6


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_gib: float  # public per-chip HBM
  peak_tflops: float  # public dense bf16 peak per chip
  hbm_gbps: float  # public HBM bandwidth per chip, GB/s


# Keyed by the topology name's prefix ("v5p:4x4x4" -> "v5p").
CHIPS = {
    "v4": Chip("TPU v4", 32, 275, 1228),
    "v5e": Chip("TPU v5e", 16, 197, 819),
    "v5p": Chip("TPU v5p", 95, 459, 2765),
    "v6e": Chip("TPU v6e", 32, 918, 1640),
    "h100": Chip("H100 SXM", 80, 989, 3352),  # dense bf16; compiled through the CUDA plugin (see below)
}
GPU_TARGETS = {"h100": pathlib.Path(__file__).parent / "gpu_targets" / "h100_sxm.txtpb"}

# The README's plan table: presets x stages x slices.
SWEEP_PRESETS = ("paper_4b", "paper_8b")
SWEEP_TOPOLOGIES = ("v5p:4x4x4", "v5e:16x16", "v6e:8x8")


def _quiet_libtpu() -> None:
  """libtpu on a host without TPUs warns about unknown workers; give it a single local host."""
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes at once


def chip_of(topology: str) -> Chip:
  kind = topology.split(":")[0]
  if kind not in CHIPS:
    raise ValueError(f"--topology={topology!r}: unknown chip {kind!r}; expected one of {sorted(CHIPS)} "
                     "followed by ':' and the slice shape, e.g. v5p:4x4x4, v5e:16x16, v6e:8x8, v4:2x2x2, h100:8")
  return CHIPS[kind]


def _gpu_devices(kind: str, shape: str):
  """Compile-only CUDA devices from a GPU target description ("h100:8" = one host with 8 GPUs,
  "h100:2x8" = 2 hosts). Needs the CUDA PJRT plugin (`pip install -e ".[gpu-aot]"`) and `ptxas`."""
  from jax.experimental import topologies
  parts = [int(x) for x in shape.split("x")]
  hosts, per_host = (1, parts[0]) if len(parts) == 1 else parts
  try:
    import jax_plugins.xla_cuda12  # noqa: F401
  except ImportError:
    raise ValueError(f"--topology={kind}:{shape}: compiling for GPUs without a GPU needs the CUDA PJRT "
                     "plugin: pip install -e \".[gpu-aot]\" (and a CUDA ptxas on PATH or in /usr/local/cuda)") from None
  return list(topologies.get_topology_desc(topology_name="", platform="cuda",
                                           target_config=GPU_TARGETS[kind].read_text(),
                                           topology=f"1x{hosts}x{per_host}").devices)


def topology_devices(topology: str):
  """The devices of a named slice, described by libtpu (or the CUDA plugin for GPUs); none needed."""
  import jax
  from jax.experimental import topologies
  chip_of(topology)
  kind, _, shape = topology.partition(":")
  if kind in GPU_TARGETS:
    return _gpu_devices(kind, shape)
  _quiet_libtpu()
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # noqa: BLE001 -- libtpu's errors are plain RuntimeErrors
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"--topology={topology!r}: libtpu cannot describe it ({msg}). Is the tpu extra "
                     f"installed (pip install -e \".[tpu]\")? jax {jax.__version__}") from None


# ----------------------------------------------------------------------------- HLO analysis
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
                "s4": 0.5, "u4": 0.5}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMP_START = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")


def _shape_bytes(text: str) -> int:
  total = 0.0
  for dtype, dims in _SHAPE.findall(text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def _condition_trips(lines: list[str]) -> int:
  """Trip count of a counted loop from its condition computation: `ROOT compare(counter, N),
  direction=LT` with N an s32 constant, the form `lax.scan` / `fori_loop` from 0 lower to (1 when the
  condition has another form)."""
  consts = {}
  for line in lines:
    m = re.match(r"^\s*%?([\w.\-]+)\s*=\s*s32\[\]\S*\s+constant\((\d+)\)", line)
    if m:
      consts[m.group(1)] = int(m.group(2))
  for line in lines:
    m = re.match(r"^\s*ROOT\s.*\scompare\(([^)]*)\).*direction=LT", line)
    if m:
      operands = re.findall(r"%?([\w.\-]+)$", m.group(1).split(",")[-1].strip())
      if operands and operands[0] in consts:
        return consts[operands[0]]
  return 1


def collective_stats(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {"count": n, "bytes": b}} over one execution of an optimised HLO module.

  Each collective's bytes are its result's (for async pairs the `-done`'s, the gathered or reduced
  output). Computations are walked from ENTRY: a while body counts its trip count times, every other
  called computation once per call. The trip count is `known_trip_count` in the while's backend
  config where there is one; the TPU compiler's optimised HLO has none, so otherwise it is read off
  the loop condition (`_condition_trips`).
  """
  comps: dict[str, list[str]] = {}
  entry = None
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP_START.match(line)
      if m and "=" not in line.split("{")[0].split("(")[0]:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    comps[current].append(line)

  own: dict[str, collections.Counter] = {}
  calls: dict[str, list[tuple[str, int]]] = {}
  for name, lines in comps.items():
    counter: collections.Counter = collections.Counter()
    edges = []
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      shape, op = m.group(1), m.group(2)
      base = op[:-5] if op.endswith("-done") else op
      if base in COLLECTIVES and not op.endswith("-start"):
        counter[(base, "count")] += 1
        counter[(base, "bytes")] += _shape_bytes(shape)
      if op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        body = re.search(r"body=%?([\w.\-]+)", line)
        cond = re.search(r"condition=%?([\w.\-]+)", line)
        n = int(trips.group(1)) if trips else _condition_trips(comps.get(cond.group(1), []) if cond else [])
        if body:
          edges.append((body.group(1), n))
        if cond:
          edges.append((cond.group(1), n + 1))
      else:
        for attr in ("calls", "to_apply", "branch_computations", "true_computation", "false_computation"):
          for group in re.findall(rf"{attr}=\{{?([^}},]+(?:,\s*%?[\w.\-]+)*)\}}?", line):
            for callee in re.findall(r"%?([\w.\-]+)", group):
              if callee in comps:
                edges.append((callee, 1))
    own[name] = counter
    calls[name] = edges

  total: collections.Counter = collections.Counter()
  memo: dict[str, collections.Counter] = {}

  def visit(name: str, depth: int = 0) -> collections.Counter:
    if name in memo:
      return memo[name]
    out = collections.Counter(own.get(name, {}))
    if depth < 64:
      for callee, n in calls.get(name, []):
        for k, v in visit(callee, depth + 1).items():
          out[k] += n * v
    memo[name] = out
    return out

  if entry is not None:
    total = visit(entry)
  kinds = sorted({k for k, _ in total})
  return {k: {"count": int(total[(k, "count")]), "bytes": int(total[(k, "bytes")])} for k in kinds}


# ----------------------------------------------------------------------------- model FLOPs
def _subjaxprs(eqn):
  from jax.extend import core as jex_core
  for v in eqn.params.values():
    for x in (v if isinstance(v, (list, tuple)) else [v]):
      if isinstance(x, jex_core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jex_core.Jaxpr):
        yield x


def jaxpr_flops(jaxpr, mult: float = 1.0, scope: str | None = None) -> float:
  """FLOPs of every dot_general / conv_general_dilated in a jaxpr (scan bodies x their length).

  For a `cond`, the most expensive branch counts (the update branch of the NaN guard). scope: count
  only the operations traced under a `jax.named_scope` of that name (their gradients included).
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    counted = scope is None or scope in str(eqn.source_info.name_stack)
    if name == "dot_general" and counted:
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += mult * 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
    elif name == "conv_general_dilated" and counted:
      rhs = eqn.invars[1].aval.shape
      out_ch = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += mult * 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_ch
    subs = list(_subjaxprs(eqn))
    if name == "cond":
      total += max((jaxpr_flops(s, mult, scope) for s in subs), default=0.0)
    else:
      inner = mult * (eqn.params["length"] if name == "scan" else 1)
      total += sum(jaxpr_flops(s, inner, scope) for s in subs)
  return total


def model_flops(fn: Callable, *args) -> float:
  return sum(model_flops_split(fn, *args))


def model_flops_split(fn: Callable, *args) -> tuple[float, float]:
  """(FLOPs outside attention, attention FLOPs) of `fn`'s matmuls and convolutions. The attention
  part is what the XLA form of attention (`layers.ATTENTION_SCOPE`) computes, gradients included."""
  import jax
  from depthvlm_jax.model.layers import ATTENTION_SCOPE
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  attention = jaxpr_flops(jaxpr, scope=ATTENTION_SCOPE)
  return jaxpr_flops(jaxpr) - attention, attention


# ----------------------------------------------------------------------------- compiling
def _abstract(tree, shardings):
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


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


@dataclasses.dataclass
class Setup:
  """Everything the programs of one config on one slice are built from."""

  config: Any
  topology: str
  chip: Chip
  mesh: Any
  model: Any
  spec: Any  # pipeline.ExampleSpec of the bucket compiled (the first of `specs` by default)
  depth_grid: tuple[int, int]
  params_like: Any  # abstract params with their shardings
  mask: Any
  specs: Any = ()  # every training bucket of the config

  def for_bucket(self, spec) -> "Setup":
    """The same setup for another bucket."""
    return dataclasses.replace(self, spec=spec, depth_grid=spec.token_grid(self.model.config.vision.image_token_pixels))


def shard_bytes(tree) -> int:
  """Per-device bytes of a tree of sharded abstract (or concrete) arrays, without layout padding."""
  import jax
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def make_setup(config, topology: str | None, devices=None) -> Setup:
  """Model, mesh, bucket and sharded abstract params of `config` on a named TPU slice (or `devices`)."""
  from depthvlm_jax import sharding
  from depthvlm_jax.train import trainer
  devices = topology_devices(topology) if devices is None else devices
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  sharding.check_batch_divides(mesh, config.train.global_batch, config.train.micro_batches)
  trainer.check_attention_impl(config, mesh)
  model = trainer.build_model(config)
  params_like, mask = trainer.params_like(config, model, mesh)  # frozen towers in model.frozen_dtype
  specs = trainer.example_specs(config, model.config)
  return Setup(config, topology, chip_of(topology) if topology else None, mesh, model, specs[0],
               specs[0].token_grid(model.config.vision.image_token_pixels), params_like, mask, tuple(specs))


def _batch_like(s: Setup, batch: int) -> dict[str, Any]:
  """The global train batch as the trainer builds it (`trainer._to_global`), abstract and sharded."""
  import jax
  from depthvlm_jax import sharding
  from depthvlm_jax.train import trainer
  out = {}
  for k, (shape, dtype) in s.spec.batch_shapes(s.model.config, batch).items():
    if k == "position_ids":
      shape = (shape[1], shape[0]) + shape[2:]  # (B, 3, L) -> (3, B, L)
    names = trainer.batch_names(k)
    out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.activation_sharding(s.mesh, *names, shape=shape))
  return out


@dataclasses.dataclass
class TrainInputs:
  optimizer: Any
  state_shardings: Any
  state: Any  # abstract train state (step, params, opt_state, counters), sharded
  frozen: Any  # abstract frozen params, sharded
  batch: Any  # abstract global batch, sharded


def train_inputs(s: Setup) -> TrainInputs:
  """The train step's abstract arguments with the shardings the trainer gives them."""
  import jax
  from depthvlm_jax import sharding
  from depthvlm_jax.train import checkpoints, optim
  from depthvlm_jax.train.step import initial_state
  c = s.config
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(c.train.lr, 1000, c.train.warmup_fraction),
                                   c.train.grad_clip, c.train.weight_decay)
  trainable, frozen = optim.split_params(s.params_like, s.mask)
  opt_like = checkpoints.optimizer_state_like(optimizer, trainable, s.mesh)
  replicated = sharding.activation_sharding(s.mesh)
  state_abs = jax.eval_shape(initial_state, trainable, opt_like)
  state_sh = {k: jax.tree.map(lambda x: x.sharding, v) if k in ("params", "opt_state") else replicated
              for k, v in dict(state_abs, params=trainable, opt_state=opt_like).items()}
  return TrainInputs(optimizer, state_sh, _abstract(state_abs, state_sh), frozen, _batch_like(s, c.train.global_batch))


COST_KEYS = ("flops", "bytes_accessed", "est_step_s")


def scanned_runs(model) -> tuple[list[int], list[int]]:
  """Trip counts of the layer loops `scan_layers` compiles: (text runs, vision runs); empty without it."""
  if not model.scan_layers:
    return [], []
  from depthvlm_jax.model.vision import block_runs
  c = model.config
  text = [c.text.num_hidden_layers - len(c.vision.deepstack_visual_indexes)]
  vision = [len(run) for run in block_runs(c.vision)]
  return [n for n in text if n > 1], [n for n in vision if n > 1]


def _correct_layer_loops(out: dict[str, Any], s: Setup, build: Callable, args: tuple,
                         towers: tuple[str, ...] = ("text", "vision")) -> None:
  """Per-step cost figures for a program whose layers run as `lax.scan` loops.

  The cost model counts each loop body once. One iteration's cost is read as a difference: the
  program compiled again with the last block of the text run (then of every vision run) applied after
  its loop (`scan_tail`, same result) costs exactly one more block. Each run then adds (trips - 1)
  iterations. Runs inside the micro-batch loop, so this comes before that loop's correction.
  towers: the towers whose loops the program runs (prefill: the vision tower only; its text layers
  run one call per layer to fill the KV cache).
  """
  text, vision = scanned_runs(s.model)
  text, vision = (text if "text" in towers else []), (vision if "vision" in towers else [])
  if not text and not vision:
    return
  info: dict[str, Any] = {"reported": {k: out[k] for k in COST_KEYS}, "text_trips": text, "vision_trips": vision}
  for tower, runs, tail in (("text", text, (1, 0)), ("vision", vision, (0, 1))):
    if not runs:
      continue
    probe = compile_stats(build(s.model.clone(scan_tail=tail)), args)
    if not probe["fits"]:
      raise RuntimeError(f"the {tower} loop-cost probe did not compile: {probe['error']}")
    one = {k: (probe[k] - info["reported"][k]) / len(runs) for k in COST_KEYS}
    info[f"{tower}_iteration"] = one
    info[f"{tower}_probe_compile_s"] = probe["compile_s"]
    for k in COST_KEYS:
      out[k] += sum(n - 1 for n in runs) * one[k]
  out["layer_loop_correction"] = info


def train_program(s: Setup, memory_only: bool = False) -> dict[str, Any]:
  """Compiles the trainer's step (and, for a scanned step, the update alone) and reports it.

  memory_only: compile the step once, for its memory and collectives; the loop-cost probes and the
  update are not compiled, and the cost figures (FLOPs, bytes, time, MFU) are left out.
  """
  import jax
  import jax.numpy as jnp
  from depthvlm_jax import sharding
  from depthvlm_jax.train import trainer
  from depthvlm_jax.train.step import guarded_update
  c = s.config
  ti = train_inputs(s)
  optimizer, state_like, frozen, batch_like = ti.optimizer, ti.state, ti.frozen, ti.batch
  trainable = state_like["params"]
  replicated = sharding.activation_sharding(s.mesh)
  step = trainer.jit_train_step(c, s.model, optimizer, s.mesh, ti.state_shardings, s.depth_grid)
  def shards(compiled):
    groups = {"state": state_like, "frozen": frozen, "batch": batch_like}
    return {"argument_shard_bytes": argument_bytes_by_group(compiled, groups)}

  args = (state_like, frozen, batch_like)
  out = compile_stats(step, args, inspect=shards)
  k = c.train.micro_batches
  if memory_only:
    out.update(memory_only=True, micro_batches=k, global_batch=c.train.global_batch,
               images_per_step=c.train.global_batch)
    return out
  if out["fits"]:
    _correct_layer_loops(out, s, lambda model: trainer.jit_train_step(c, model, optimizer, s.mesh, ti.state_shardings,
                                                                      s.depth_grid), args)
  platform = s.mesh.devices.flat[0].platform
  scanned = k > 1 and platform != "cpu"
  out.update(micro_batches=k, scanned_micro_batches=scanned, global_batch=c.train.global_batch)
  if out["fits"] and scanned:
    grads_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), trainable)
    loss_like = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    update = compile_stats(jax.jit(lambda st, g, l: guarded_update(optimizer, st, g, l), donate_argnums=(0,)),
                           (state_like, grads_like, loss_like))
    out["loop_correction"] = {"update_flops": update["flops"], "update_bytes_accessed": update["bytes_accessed"],
                              "update_est_s": update["est_step_s"], "reported_flops": out["flops"],
                              "reported_est_step_s": out["est_step_s"]}
    for key, ukey in (("flops", "flops"), ("bytes_accessed", "bytes_accessed"), ("est_step_s", "est_step_s")):
      out[key] = k * (out[key] - update[ukey]) + update[ukey]
  out["model_flops"], out["attention_flops"] = _train_flops(s, ti)
  out["images_per_step"] = c.train.global_batch
  return out


def train_model_flops(s: Setup, ti: TrainInputs | None = None) -> float:
  """Model FLOPs of the train step per chip: its matmuls and convolutions traced without remat (no
  compile), divided over all chips."""
  return _train_flops(s, ti)[0]


def _train_flops(s: Setup, ti: TrainInputs | None = None) -> tuple[float, float]:
  """(model FLOPs, the attention part of them) of the train step, per chip."""
  from depthvlm_jax.train.step import make_train_step
  c = s.config
  ti = ti or train_inputs(s)
  plain = s.model.clone(remat=False)
  fn = make_train_step(plain, ti.optimizer, s.depth_grid, c.train.micro_batches, c.train.depth_loss_weight,
                       with_lm=c.stage == 2, lm_positions=c.train.lm_positions,
                       platform=s.mesh.devices.flat[0].platform)
  rest, attention = model_flops_split(fn, ti.state, ti.frozen, ti.batch)
  n = s.mesh.devices.size
  return (rest + attention) / n, attention / n


def inference_programs(s: Setup, max_new_tokens: int = 32, memory_only: bool = False,
                       programs: tuple[str, ...] = ("prefill", "decode")) -> dict[str, dict[str, Any]]:
  """The predict CLI's programs: prefill with depth for the bucket, and one decode step (memory_only:
  the prefill's loop-cost probes are not compiled). Only the named `programs` are compiled."""
  import jax
  import jax.numpy as jnp
  from depthvlm_jax import generate, sharding
  c = s.config
  batch = s.mesh.shape["data"] * s.mesh.shape["fsdp"]  # one image per batch shard
  b = _batch_like(s, batch)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), s.params_like)
  h, w = s.spec.image_size
  prefill_of = lambda model: lambda p, ids, mask, pos, px, grid: generate.prefill(
      model, p, ids, mask, pos, px, grid, max_new_tokens=max_new_tokens, depth_grid=s.depth_grid,
      depth_output_size=(h, w), images_per_row=1)
  prefill_fn = prefill_of(s.model)
  # Compiled traced under the mesh (its platform picks the attention kernel, see `trainer.jit_train_step`);
  # model FLOPs are counted on the plain trace, whose attention is the XLA form.
  prefill = jax.jit(sharding.in_mesh(prefill_fn, s.mesh))
  args = (params, b["input_ids"], b["attention_mask"], b["position_ids"], b["pixel_values"], b["image_grid_hw"])
  out = {}
  if "prefill" in programs:
    out["prefill"] = compile_stats(prefill, args)
    if memory_only:
      out["prefill"]["memory_only"] = True
    elif out["prefill"]["fits"]:
      _correct_layer_loops(out["prefill"], s, lambda model: jax.jit(sharding.in_mesh(prefill_of(model), s.mesh)),
                           args, towers=("vision",))
    rest, attention = model_flops_split(prefill_fn, *args)
    out["prefill"]["model_flops"] = (rest + attention) / s.mesh.devices.size
    out["prefill"]["attention_flops"] = attention / s.mesh.devices.size
    out["prefill"]["images_per_step"] = batch
  if "decode" not in programs:
    return out

  t = s.model.config.text
  slots = s.spec.seq_len + max_new_tokens
  cache_sh = sharding.activation_sharding(s.mesh, "batch", None, "kv_heads", None,
                                          shape=(batch, slots, t.num_key_value_heads, t.head_dim))
  cache_dtype = s.model.dtype
  kv = jax.ShapeDtypeStruct((batch, slots, t.num_key_value_heads, t.head_dim), cache_dtype, sharding=cache_sh)
  cache = [(kv, kv) for _ in range(t.num_hidden_layers)]
  tok = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.activation_sharding(s.mesh, "batch", shape=(batch,)))
  pos = jax.ShapeDtypeStruct((3, batch, 1), jnp.int32,
                             sharding=sharding.activation_sharding(s.mesh, None, "batch", shape=(3, batch, 1)))
  valid = jax.ShapeDtypeStruct((batch, slots), jnp.int32,
                               sharding=sharding.activation_sharding(s.mesh, "batch", shape=(batch, slots)))
  index = jax.ShapeDtypeStruct((), jnp.int32)
  # no `in_mesh` here: with FSDP weights, pinning the tiny decode activations made the compiler
  # gather every weight (v5e 2x4, mesh 2,4,1: 0.19 -> 0.40 ms, 2.6 -> 76 MiB temp per chip)
  decode = jax.jit(lambda p, tk, ps, kvalid, ch, i: generate.decode_step(s.model, p, tk, ps, kvalid, ch, i),
                   donate_argnums=(4,))
  dargs = (params, tok, pos, valid, cache, index)
  out["decode"] = compile_stats(decode, dargs)
  out["decode"]["model_flops"] = model_flops(decode, *dargs) / s.mesh.devices.size
  out["decode"]["images_per_step"] = 0
  out["decode"]["tokens_per_step"] = batch
  return out


# The custom call of Pallas TPU kernels (Mosaic), which the TPU cost analysis does not cost.
UNCOSTED_CUSTOM_CALL = "tpu_custom_call"


def _finish(row: dict[str, Any], chip: Chip | None) -> dict[str, Any]:
  """Adds the chip's HBM, MFU and throughput figures."""
  row["hbm_gib"] = chip.hbm_gib if chip else None
  if row.get("fits") and not row.get("flops"):  # no cost model at all: count the model's own FLOPs
    row["flops"] = row["model_flops"]
  if chip is not None and row.get("fits") and row["peak_gib"] > chip.hbm_gib:
    row["fits"] = False
    row["error"] = f"peak {row['peak_gib']:.2f} GiB per chip > {chip.hbm_gib} GiB HBM"
  if not row.get("fits") or row.get("memory_only"):
    for k in ("argument_gib", "output_gib", "peak_gib", "flops", "bytes_accessed", "est_step_s", "est_mfu",
              "images_per_s", "est_hours"):
      row[k] = row.get(k) if k.endswith("_gib") else None
    row.setdefault("collectives", {})
    return row
  # The cost model's `optimal_seconds` is -1 for some programs and can be pulled low by ops it does
  # not model (measured here: a prefill reporting -0.9994 s, a 4-micro-batch step -16 s). The roofline
  # (FLOPs at peak, bytes at HBM bandwidth) bounds any real execution from below, so the estimate is
  # the larger of the two, and `est_source` says which one it is.
  roofline = max(row["flops"] / (chip.peak_tflops * 1e12), row["bytes_accessed"] / (chip.hbm_gbps * 1e9)) if chip else 0.0
  row["xla_optimal_s"] = row["est_step_s"]
  row["roofline_s"] = roofline
  row["est_source"] = "xla_optimal_seconds" if row["est_step_s"] >= roofline else "roofline"
  # XLA's TPU cost model skips Pallas kernels (the splash attention calls): neither their FLOPs nor
  # their bytes are in `flops` / `optimal_seconds`. They are charged the attention FLOPs of the same
  # program traced with the XLA form, at the chip's peak: the least time they can take with full
  # (unmasked) attention; causal blocks the kernel skips make text attention cheaper than that.
  kernel_s = 0.0
  if chip and row.get("uncosted_kernels") and row.get("attention_flops"):
    kernel_s = row["attention_flops"] / (chip.peak_tflops * 1e12)
  row["uncosted_kernel_s"] = kernel_s
  row["est_step_s"] = max(row["est_step_s"], roofline) + kernel_s
  t = row["est_step_s"]
  row["est_mfu"] = row["model_flops"] / (t * chip.peak_tflops * 1e12) if chip and t > 0 else None
  images = row.get("images_per_step", 0)
  row["images_per_s"] = images / t if images and t > 0 else None
  row["est_hours"] = PAPER_EPOCH_IMAGES / row["images_per_s"] / 3600 if row["images_per_s"] else None
  if row.get("tokens_per_step"):
    row["tokens_per_s"] = row["tokens_per_step"] / t if t > 0 else None
  return row


PROGRAMS = ("train", "prefill", "decode")


def report(config, topology: str, programs=PROGRAMS, devices=None,
           buckets: tuple[str, ...] = (), memory_only: bool = False) -> dict[str, Any]:
  """{"topology", "chips", "mesh", "config", "buckets", "programs": {"NAME@HxW": figures}} for one config
  on one slice, every program compiled for each bucket (or the `buckets` named "HxW"). memory_only:
  see `train_program`."""
  t0 = time.time()
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown or not programs:
    raise ValueError(f"--programs={','.join(programs)}: expected one or more of {', '.join(PROGRAMS)}")
  s = make_setup(config, topology, devices)
  specs = [sp for sp in s.specs if not buckets or sp.name in buckets]
  if not specs:
    raise ValueError(f"--buckets={','.join(buckets)}: none of the config's buckets "
                     f"{[sp.name for sp in s.specs]}")
  out: dict[str, Any] = {"topology": topology, "chips": int(s.mesh.devices.size), "mesh": dict(s.mesh.shape),
                         "preset": config.preset, "stage": config.stage,
                         "buckets": [{"image_size": list(sp.image_size), "seq_len": sp.seq_len} for sp in specs],
                         "global_batch": config.train.global_batch, "micro_batches": config.train.micro_batches,
                         "programs": {}}
  for spec in specs:
    sb = s.for_bucket(spec)
    if "train" in programs:
      out["programs"][f"train@{spec.name}"] = _finish(train_program(sb, memory_only), s.chip)
    if {"prefill", "decode"} & set(programs):
      wanted = tuple(p for p in ("prefill", "decode") if p in programs)
      for name, row in inference_programs(sb, memory_only=memory_only, programs=wanted).items():
        out["programs"][f"{name}@{spec.name}"] = _finish(row, s.chip)
  # what the report cost this host: wall time, and peak resident memory (ru_maxrss is in KiB on Linux)
  out["host"] = {"report_s": round(time.time() - t0, 1),
                 "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
  return out


# ----------------------------------------------------------------------------- output
def _fmt(x, spec=".2f"):
  return "-" if x is None else format(x, spec)


def table(reports: list[dict[str, Any]]) -> str:
  head = ("| preset | stage | slice (chips) | mesh d,f,t | program | fits | arg GiB | temp GiB | peak GiB / HBM | "
          "compile s | est step s | est MFU | images/s | epoch h | collectives (count, GiB) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in reports:
    mesh = r.get("mesh", {})
    for name, p in r.get("programs", {}).items():
      coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / GiB:.2f})" for k, v in p.get("collectives", {}).items())
      fits = "yes" if p.get("fits") else "**no**"
      peak = f"{_fmt(p.get('peak_gib'))} / {_fmt(p.get('hbm_gib'), 'g')}"
      if not p.get("fits") and p.get("temp_gib") is not None and p.get("peak_gib") is None:
        peak = f"temp {p['temp_gib']:.1f} / {_fmt(p.get('hbm_gib'), 'g')}"
      mfu = None if p.get("est_mfu") is None else 100 * p["est_mfu"]
      lines.append(f"| {r['preset']} | {r['stage']} | {r['topology']} ({r['chips']}) | "
                   f"{mesh.get('data', '-')},{mesh.get('fsdp', '-')},{mesh.get('tensor', '-')} | {name} | {fits} | "
                   f"{_fmt(p.get('argument_gib'))} | {_fmt(p.get('temp_gib'))} | {peak} | {_fmt(p.get('compile_s'), '.0f')} | "
                   f"{_fmt(p.get('est_step_s'), '.3g')} | {_fmt(mfu, '.0f')}{'%' if mfu is not None else ''} | "
                   f"{_fmt(p.get('images_per_s'), '.0f')} | {_fmt(p.get('est_hours'), '.1f')} | {coll or '-'} |")
  return "\n".join(lines)


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


# Largest per-chip micro-batch the sweep gives each stage on each chip (samples), from the chip's HBM.
# v5p: 5 / 10 rows measured at 11.2 / 22.8 GiB peak (paper_4b, 768x1024); v6e (32 GiB) takes 5 in both
# stages from those, and the H100 (80 GB) the v5p's; v4 and v5e are estimates.
SWEEP_MICRO_BATCH = {1: {"v4": 2, "v5e": 1, "v5p": 5, "v6e": 5, "h100": 5},
                     2: {"v4": 1, "v5e": 1, "v5p": 10, "v6e": 5, "h100": 10}}


def slice_overrides(stage: int, global_batch: int, topology: str, chips: int) -> list[str]:
  """Mesh and micro-batching for one sweep row, as --config overrides.

  FSDP over every chip, or FSDP x 2-way tensor parallelism when the global batch does not split
  over every chip (640 over 256 v5e chips); then the fewest micro-batches whose per-chip rows stay
  within `SWEEP_MICRO_BATCH`.
  """
  tensor = 1
  while global_batch % (chips // tensor) and tensor < chips:
    tensor *= 2
  shards = chips // tensor
  per_chip = global_batch // shards
  limit = SWEEP_MICRO_BATCH[stage][topology.split(":")[0]]
  k = next(k for k in range(1, per_chip + 1) if per_chip % k == 0 and per_chip // k <= limit)
  return [f"--config.mesh.fsdp={shards}", f"--config.mesh.tensor={tensor}", "--config.mesh.data=1",
          f"--config.train.micro_batches={k}"]


def sweep(out_dir: pathlib.Path, presets=SWEEP_PRESETS, topologies=SWEEP_TOPOLOGIES, stages=(1, 2),
          programs=("train",), timeout_s: int = 7200, memory_only: bool = False,
          buckets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
  """One subprocess per (preset, stage, slice) so each compile starts clean; JSON files in out_dir.

  Rows already in out_dir are reused, so an interrupted sweep continues where it stopped.
  """
  from configs import stage1, stage2
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for preset in presets:
    for stage in stages:
      batch = (stage1 if stage == 1 else stage2).get_config(preset).train.global_batch
      for topo in topologies:
        path = out_dir / f"{preset}_stage{stage}_{topo.replace(':', '_')}.json"
        if not path.exists():
          chips = len(topology_devices(topo))
          cmd = [sys.executable, "-m", "depthvlm_jax.aot", f"--config=configs/stage{stage}.py:{preset}",
                 f"--topology={topo}", f"--json={path}", f"--programs={','.join(programs)}",
                 *(["--memory_only"] if memory_only else []), *([f"--buckets={','.join(buckets)}"] if buckets else []),
                 *slice_overrides(stage, batch, topo, chips)]
          print("+", " ".join(cmd), flush=True)
          try:
            subprocess.run(cmd, check=False, timeout=timeout_s)
          except subprocess.TimeoutExpired:
            print(f"{path.name}: compile did not finish in {timeout_s} s", flush=True)
        if path.exists():
          rows.append(json.loads(path.read_text()))
  return rows


def main(argv):
  from absl import flags
  del argv
  f = flags.FLAGS
  if f.sweep:
    rows = sweep(pathlib.Path(f.sweep_out), presets=tuple(f.sweep_presets), topologies=tuple(f.sweep_topologies),
                 programs=tuple(f.programs), memory_only=f.memory_only, buckets=tuple(f.buckets))
    print(table(rows))
    return 0
  if not f.topology:
    print("error: --topology is required (e.g. --topology=v5p:4x4x4), or --sweep", file=sys.stderr)
    return 2
  try:
    chip_of(f.topology)
    result = report(f["config"].value, f.topology, tuple(f.programs), buckets=tuple(f.buckets),
                    memory_only=f.memory_only)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(table([result]))
  if f.json:
    pathlib.Path(f.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(f.json + ".tmp")
    tmp.write_text(json.dumps(_json_safe(result), indent=2))
    os.replace(tmp, f.json)
  return 0


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/stage1.py", "Training configuration file.", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:4x4x4, v5e:16x16, v6e:8x8, v5e:2x2.")
  flags.DEFINE_string("json", None, "Write the report as JSON here.")
  flags.DEFINE_list("programs", list(PROGRAMS), "Programs to compile (with --sweep: "
                    "give e.g. --programs=train to compile the train steps only).")
  flags.DEFINE_list("buckets", [], "Compile only these buckets of data.buckets, as HxW (default: all).")
  flags.DEFINE_bool("memory_only", False, "Train programs: compile the step once for memory and collectives, "
                    "without the loop-cost probes (one compile instead of three; no FLOPs, time or MFU).")
  flags.DEFINE_bool("sweep", False, "Compile the README plan table (paper presets x stages x slices).")
  flags.DEFINE_string("sweep_out", "runs/aot_sweep", "Folder for the sweep's per-row JSON files.")
  flags.DEFINE_list("sweep_presets", list(SWEEP_PRESETS), "Presets of the sweep.")
  flags.DEFINE_list("sweep_topologies", list(SWEEP_TOPOLOGIES), "Slices of the sweep.")


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host traces on the CPU; libtpu only compiles
  _quiet_libtpu()
  from absl import app
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
