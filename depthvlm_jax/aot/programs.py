"""The programs a report compiles, built as the trainer and the predict CLI build them.

  train    `model_state.jit_train_programs`: the trainer's own jitted, donated programs of one update
           (same model, rules, shardings): `accumulate` on one micro-batch laid out as the trainer
           lays it out, and `apply`; one update runs `accumulate` K times, then `apply`;
  prefill  `generate.prefill` with the depth head for the bucket, one image per batch shard, the
           KV cache sized for `max_new_tokens`;
  decode   one `generate.decode_step` on that cache.

Each is lowered with abstract inputs that carry their final shardings on the mesh and compiled;
nothing is allocated. The compiler's cost model counts a while-loop body once, so the cost figures
of programs whose layers run as loops are corrected from extra compiles (`_correct_layer_loops`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from depthvlm_jax.aot.chips import Chip, chip_of, topology_devices
from depthvlm_jax.aot.compiling import argument_bytes_by_group, compile_stats
from depthvlm_jax.aot.flops import model_flops, model_flops_split


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


def make_setup(config, topology: str | None, devices=None) -> Setup:
  """Model, mesh, bucket and sharded abstract params of `config` on a named TPU slice (or `devices`)."""
  from depthvlm_jax import sharding
  from depthvlm_jax.runs import model_from_config
  from depthvlm_jax.train.config_checks import check_attention_impl
  from depthvlm_jax.train.data import example_specs
  devices = topology_devices(topology) if devices is None else devices
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  sharding.check_batch_divides(mesh, config.train.global_batch, config.train.micro_batches)
  check_attention_impl(config, mesh)
  model = model_from_config.build_model(config)
  params_like, mask = model_from_config.params_like(config, model, mesh)  # frozen towers in model.frozen_dtype
  specs = example_specs(config, model.config)
  return Setup(config, topology, chip_of(topology) if topology else None, mesh, model, specs[0],
               specs[0].token_grid(model.config.vision.image_token_pixels), params_like, mask, tuple(specs))


def _abstract(tree, shardings):
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _batch_like(s: Setup, batch: int) -> dict[str, Any]:
  """The global train batch as the trainer builds it (`data.to_global`), abstract and sharded."""
  import jax
  from depthvlm_jax import sharding
  from depthvlm_jax.train.data import batch_names
  out = {}
  for k, (shape, dtype) in s.spec.batch_shapes(s.model.config, batch).items():
    if k == "position_ids":
      shape = (shape[1], shape[0]) + shape[2:]  # (B, 3, L) -> (3, B, L)
    names = batch_names(k)
    out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.activation_sharding(s.mesh, *names, shape=shape))
  return out


@dataclasses.dataclass
class TrainInputs:
  optimizer: Any
  state_shardings: Any
  state: Any  # abstract train state (step, params, opt_state, counters), sharded
  frozen: Any  # abstract frozen params, sharded
  batch: Any  # abstract micro-batch (global_batch / micro_batches rows), sharded: what `accumulate` takes
  counts: Any  # abstract per-row loss denominators of the global batch (`step.row_counts`)
  accumulator: Any  # abstract gradient accumulator, sharded
  full_batch: Any  # abstract global batch, sharded (the one-program step, for counting model FLOPs)


def train_inputs(s: Setup) -> TrainInputs:
  """The train programs' abstract arguments with the shardings the trainer gives them."""
  import jax
  from depthvlm_jax import sharding
  from depthvlm_jax.runs import checkpoints, freeze
  from depthvlm_jax.train import optim
  from depthvlm_jax.train.model_state import accumulator_like
  from depthvlm_jax.train.sizing import counts_like
  from depthvlm_jax.train.step import initial_state
  c = s.config
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(c.train.lr, 1000, c.train.warmup_fraction),
                                   c.train.grad_clip, c.train.weight_decay)
  trainable, frozen = freeze.split_params(s.params_like, s.mask)
  opt_like = checkpoints.optimizer_state_like(optimizer, trainable, s.mesh)
  replicated = sharding.activation_sharding(s.mesh)
  state_abs = jax.eval_shape(initial_state, trainable, opt_like)
  state_sh = {k: jax.tree.map(lambda x: x.sharding, v) if k in ("params", "opt_state") else replicated
              for k, v in dict(state_abs, params=trainable, opt_state=opt_like).items()}
  state = _abstract(state_abs, state_sh)
  b = c.train.global_batch
  return TrainInputs(optimizer, state_sh, state, frozen, _batch_like(s, b // c.train.micro_batches),
                     counts_like(b, s.mesh), accumulator_like(state, s.mesh), _batch_like(s, b))


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


def _add_collectives(times: int, loop: dict[str, Any], once: dict[str, Any]) -> dict[str, Any]:
  out = {}
  for kind in sorted(set(loop) | set(once)):
    a, b = loop.get(kind, {"count": 0, "bytes": 0}), once.get(kind, {"count": 0, "bytes": 0})
    out[kind] = {"count": times * a["count"] + b["count"], "bytes": times * a["bytes"] + b["bytes"]}
  return out


def train_program(s: Setup, memory_only: bool = False) -> dict[str, Any]:
  """Compiles the trainer's programs of one update (`accumulate` and `apply`) and reports the update.

  Memory: the figures (`argument_gib`, `temp_gib`, ...) are `accumulate`'s, the program that runs
  with the most on the devices; `next_micro_batch_gib` is the micro-batch transferred while it runs;
  peak_gib = the larger of accumulate's peak plus that micro-batch, and `apply`'s peak (under `apply`).
  Costs and collectives: K x accumulate + apply. memory_only: the loop-cost probes are not compiled,
  and the cost figures (FLOPs, bytes, time, MFU) are left out.
  """
  from depthvlm_jax.aot.compiling import GiB, shard_bytes
  from depthvlm_jax.train.model_state import jit_train_programs
  c = s.config
  ti = train_inputs(s)
  programs = jit_train_programs(c, s.model, ti.optimizer, s.mesh, ti.state, s.depth_grid)

  def shards(compiled):
    groups = {"state": ti.state, "frozen": ti.frozen, "accumulator": ti.accumulator, "batch": ti.batch,
              "counts": ti.counts}
    return {"argument_shard_bytes": argument_bytes_by_group(compiled, groups)}

  args = (ti.state, ti.frozen, ti.accumulator, ti.batch, ti.counts)
  out = compile_stats(programs.accumulate, args, inspect=shards)
  k = c.train.micro_batches
  out.update(micro_batches=k, global_batch=c.train.global_batch, images_per_step=c.train.global_batch)
  if not out["fits"]:
    return out
  apply = compile_stats(programs.apply, (ti.state, ti.frozen, ti.accumulator))
  out["apply"] = {key: apply.get(key) for key in ("fits", "error", "compile_s", "argument_gib", "temp_gib",
                                                  "peak_gib", "flops", "bytes_accessed", "est_step_s")}
  if not apply["fits"]:
    out.update(fits=False, error=f"apply: {apply['error']}")
    return out
  out["accumulate_peak_gib"] = out["peak_gib"]
  out["next_micro_batch_gib"] = shard_bytes(ti.batch) / GiB
  out["peak_gib"] = max(out["peak_gib"] + out["next_micro_batch_gib"], apply["peak_gib"])
  out["collectives"] = _add_collectives(k, out["collectives"], apply["collectives"])
  if memory_only:
    out["memory_only"] = True
    return out
  _correct_layer_loops(out, s, lambda model: jit_train_programs(c, model, ti.optimizer, s.mesh, ti.state,
                                                                s.depth_grid).accumulate, args)
  out["accumulate_cost"] = {key: out[key] for key in COST_KEYS}
  for key in COST_KEYS:
    out[key] = k * out[key] + apply[key]
  out["model_flops"], out["attention_flops"] = _train_flops(s, ti)
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
  rest, attention = model_flops_split(fn, ti.state, ti.frozen, ti.full_batch)
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
  # Compiled traced under the mesh (its platform picks the attention kernel, see `model_state.jit_train_programs`);
  # model FLOPs are counted on the plain trace, whose attention is the XLA form.
  prefill = jax.jit(sharding.in_mesh(prefill_fn, s.mesh))
  # inference takes the host processor's rows (float32), not the train batch's uint8 pixels
  v = s.model.config.vision
  rows = (batch, (h // v.patch_size) * (w // v.patch_size), v.patch_dim)
  pixel_values = jax.ShapeDtypeStruct(rows, jnp.float32, sharding=sharding.activation_sharding(s.mesh, "batch", shape=rows))
  args = (params, b["input_ids"], b["attention_mask"], b["position_ids"], pixel_values, b["image_grid_hw"])
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
