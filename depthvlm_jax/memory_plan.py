"""Memory and throughput plan for the paper presets on TPU slices and 8xH100, computed from the configs.

    python -m depthvlm_jax.memory_plan    # (from the repository root) both presets, both stages, all slices
    python -m depthvlm_jax.memory_plan --presets=paper_4b --stages=2 --image_size=1152,1152

Nothing here is hand-typed about the model: every figure comes from tracing the real code abstractly
(no arrays are allocated, no weights needed):

* parameters: `jax.eval_shape` of the DepthVLM init built by the trainer (`trainer.build_model`) from
  `configs/stage{1,2}.py`; trainable/frozen split by the stage's regex rules (`optim.trainable_mask`);
  optimizer state from `jax.eval_shape(optimizer.init)` (AdamW: fp32 mu and nu per trainable param);
  gradients are fp32 per trainable parameter and counted twice (the train step's accumulator and the
  current micro-batch's gradient, then the optimizer's update, are alive together);
* per-device parameter bytes under a mesh: the project's logical-axis rules (`sharding.DEFAULT_RULES`)
  applied to every leaf exactly as `sharding.logical_shardings` does, dimensions that do not divide
  stay replicated;
* activations: the residuals that `jax.vjp` of the train step's loss saves for the backward pass
  (w.r.t. the trainable subtree only, so the frozen vision tower -- and in stage 1 the frozen LLM --
  save nothing), with and without `remat`. Residuals computed from parameters alone (e.g. bf16
  copies of weights) are counted separately as `weight_residuals` and sharded like parameters;
  on top comes a transient working set: the two largest intermediates of the step (e.g. fp32
  attention logits and their softmax) plus, with remat, one layer's recomputed internals;
* FLOPs: every `dot_general` / `conv_general_dilated` in the jaxpr of `jax.grad` of the loss
  (forward, remat recomputation and backward), so a frozen tower is counted once (forward only).

Assumptions (stated, not measured here): peak dense bf16 FLOP/s per chip (v4 275 T, v5e 197 T,
v5p 459 T, H100 SXM 989 T), model FLOPs utilisation `--mfu` (default 0.40), 10% of HBM kept free
for XLA buffers and fragmentation; activations are counted unsharded over the `tensor` axis (an
upper bound: tensor parallelism here only cuts parameter and optimizer memory).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from depthvlm_jax import sharding
from depthvlm_jax.model.hf_params import flatten
from depthvlm_jax.train import optim
from depthvlm_jax.train.step import loss_terms

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_gib: float
  peak_tflops: float  # dense bf16


CHIPS = {
    "v4": Chip("TPU v4", 32, 275),
    "v5e": Chip("TPU v5e", 16, 197),
    "v5p": Chip("TPU v5p", 95, 459),
    "h100": Chip("H100 SXM", 80, 989),
}

# (slice name, chip, number of chips). v4-N and v5p-N count TensorCores (2 per chip), v5e-N chips.
SLICES = (
    ("v4-32", "v4", 16), ("v4-128", "v4", 64),
    ("v5e-32", "v5e", 32), ("v5e-256", "v5e", 256),
    ("v5p-32", "v5p", 16), ("v5p-128", "v5p", 64),
    ("8xH100", "h100", 8),
)


# ----------------------------------------------------------------------------- model and shapes
def batch_shapes(model_config, image_size: tuple[int, int], seq_len: int, batch: int) -> dict[str, Any]:
  """Abstract train batch as the pipeline delivers it: one image of `image_size` (H, W) per sample.

  input_ids/attention_mask/labels (B, L), position_ids (3, B, L), pixel_values (B, P, patch_dim),
  image_grid_hw (B, 2), depth (B, H, W), has_depth (B,).
  """
  v = model_config.vision
  h, w = image_size
  patches = (h // v.patch_size) * (w // v.patch_size)
  s = jax.ShapeDtypeStruct
  return {
      "input_ids": s((batch, seq_len), jnp.int32), "attention_mask": s((batch, seq_len), jnp.int32),
      "labels": s((batch, seq_len), jnp.int32), "position_ids": s((3, batch, seq_len), jnp.int32),
      "pixel_values": s((batch, patches, v.patch_dim), jnp.float32),
      "image_grid_hw": s((batch, 2), jnp.int32), "depth": s((batch, h, w), jnp.float32),
      "has_depth": s((batch,), jnp.bool_),
  }


@dataclasses.dataclass
class ParamPlan:
  """Abstract parameter / optimizer trees of one stage, with their logical partition specs."""

  model: Any
  boxed: Any  # boxed abstract params (logical axis names)
  mask: dict  # {path: trainable?}
  trainable: Any  # abstract trainable subtree
  frozen: Any
  opt_state: Any  # abstract optax state of the trainable subtree

  @property
  def counts(self) -> dict[str, int]:
    flat = flatten(nn.unbox(self.boxed))
    out = {"total": sum(math.prod(x.shape) for x in flat.values()),
           "trainable": sum(math.prod(x.shape) for p, x in flat.items() if self.mask[p])}
    for p, x in flat.items():
      out[p[0]] = out.get(p[0], 0) + math.prod(x.shape)
    return out


def param_plan(config) -> ParamPlan:
  """Abstract params, trainable split and AdamW state for a stage config (configs/stage{1,2}.py)."""
  from depthvlm_jax.train import trainer  # the trainer builds the model exactly as training does
  model = trainer.build_model(config)
  boxed = trainer.abstract_boxed_params(model)
  params = nn.unbox(boxed)
  mask = optim.trainable_mask(params, list(map(tuple, config.train.trainable)))
  trainable, frozen = optim.split_params(params, mask)
  opt = optim.make_optimizer(lambda step: 1e-4, config.train.grad_clip, config.train.weight_decay)
  opt_state = jax.eval_shape(opt.init, trainable)
  return ParamPlan(model, boxed, mask, trainable, frozen, opt_state)


def _shard_bytes(shape, dtype, spec, mesh_shape: dict[str, int]) -> int:
  fitted = sharding._fit_spec(spec, shape, types.SimpleNamespace(shape=mesh_shape))
  local = list(shape)
  for i, axes in enumerate(tuple(fitted)):
    if axes is not None:
      for a in ((axes,) if isinstance(axes, str) else axes):
        local[i] //= mesh_shape[a]
  return math.prod(local) * np.dtype(dtype).itemsize


def state_bytes_per_device(pp: ParamPlan, mesh_shape: dict[str, int], accumulate: bool = True) -> dict[str, int]:
  """Per-device bytes of params / fp32 grads / optimizer state under `mesh_shape` and the rules.

  Grads and optimizer moments take the sharding of their parameter (what jit propagates). With
  `accumulate` (more than one micro-batch per update) two fp32 gradients are alive together, the
  accumulator and the current micro-batch's; with one micro-batch, one. The optimizer updates
  params and moments in place (`train/step.py`), so its update adds no third copy.
  """
  specs = flatten(nn.logical_to_mesh(nn.get_partition_spec(pp.boxed), sharding.DEFAULT_RULES))
  flat = flatten(nn.unbox(pp.boxed))
  params = sum(_shard_bytes(x.shape, x.dtype, specs[p], mesh_shape) for p, x in flat.items())
  grads = (2 if accumulate else 1) * sum(_shard_bytes(x.shape, jnp.float32, specs[p], mesh_shape) for p, x in flat.items() if pp.mask[p])
  # optax keeps per-parameter leaves (AdamW mu, nu) under the parameter's own path: same sharding;
  # other leaves (step counters) are replicated
  opt = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(pp.opt_state)[0]:
    names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    spec = specs[names] if names in specs else jax.sharding.PartitionSpec()
    opt += _shard_bytes(leaf.shape, leaf.dtype, spec, mesh_shape)
  return {"params": params, "grads": grads, "opt": opt}


# ----------------------------------------------------------------------------- jaxpr analysis
def _subjaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (list, tuple)) else [v]):
      if isinstance(x, jex_core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jex_core.Jaxpr):
        yield x


def _nbytes(aval) -> int:
  return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize if hasattr(aval, "shape") else 0


def jaxpr_stats(jaxpr, mult: int = 1, stats=None) -> dict[str, float]:
  """FLOPs of matmuls/convolutions (x scan trip counts) and the largest intermediate (bytes)."""
  stats = stats if stats is not None else {"flops": 0.0, "largest": [0, 0]}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      stats["flops"] += mult * 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params["dimension_numbers"]
      out_ch = rhs[dn.rhs_spec[0]]
      stats["flops"] += mult * 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_ch
    for o in eqn.outvars:
      b = _nbytes(o.aval)
      top = stats["largest"]
      if b > top[0]:
        top[:] = [b, top[0]]
      elif b > top[1]:
        top[1] = b
    inner = mult * (eqn.params["length"] if name == "scan" else 1)
    for sub in _subjaxprs(eqn):
      jaxpr_stats(sub, inner, stats)
  return stats


def _batch_dependent(jaxpr, batch_invars) -> set:
  """Vars of the top-level jaxpr whose value depends on the batch (not on parameters alone)."""
  dep = set(batch_invars)
  for eqn in jaxpr.eqns:
    if any(isinstance(v, jex_core.Var) and v in dep for v in eqn.invars):
      dep.update(eqn.outvars)
  return dep


def lm_positions(config) -> int:
  """Positions the LM head is applied to per row in training (0 = all; see configs/common.py)."""
  return int(config.train.get("lm_positions", 0))


@dataclasses.dataclass
class StepCost:
  activation_bytes: int  # residuals saved for backward that depend on the batch
  weight_residual_bytes: int  # residuals computed from parameters alone (bf16 weight copies, ...)
  transient_bytes: int  # two largest intermediates (+ one recomputed layer with remat)
  flops: float  # forward + recompute + backward of one micro-batch


def step_cost(pp: ParamPlan, config, image_size, seq_len: int, batch: int) -> StepCost:
  """Residual bytes and FLOPs of one micro-batch of `batch` samples for the stage in `config`."""
  model = pp.model
  depth_grid = (image_size[0] // model.config.vision.image_token_pixels,
                image_size[1] // model.config.vision.image_token_pixels)
  with_lm = config.stage == 2
  batch_abs = batch_shapes(model.config, image_size, seq_len, batch)

  def loss(tp, frozen, b):
    t = loss_terms(model, optim.merge_params(tp, frozen), b, depth_grid, with_lm, lm_positions(config))
    return t["depth_sum"] + t["lm_sum"]

  n_tp = len(jax.tree.leaves(pp.trainable))
  n_fr = len(jax.tree.leaves(pp.frozen))
  vjp_jaxpr, out_shape = jax.make_jaxpr(lambda tp, fr, b: jax.vjp(lambda t: loss(t, fr, b), tp)[1],
                                        return_shape=True)(pp.trainable, pp.frozen, batch_abs)
  jaxpr = vjp_jaxpr.jaxpr
  num_res = len(jax.tree.leaves(out_shape))
  invars = set(jaxpr.invars)
  batch_dep = _batch_dependent(jaxpr, jaxpr.invars[n_tp + n_fr:])
  act = wres = 0
  seen = set()
  for v in jaxpr.outvars[len(jaxpr.outvars) - num_res:]:
    if not isinstance(v, jex_core.Var) or v in invars or v in seen:
      continue  # parameters and inputs themselves are counted elsewhere
    seen.add(v)
    if v in batch_dep:
      act += _nbytes(v.aval)
    else:
      wres += _nbytes(v.aval)
  grad_jaxpr = jax.make_jaxpr(jax.grad(loss))(pp.trainable, pp.frozen, batch_abs).jaxpr
  stats = jaxpr_stats(grad_jaxpr)
  return StepCost(act, wres, sum(stats["largest"]), stats["flops"])


def step_costs(pp: ParamPlan, config, image_size, seq_len: int, batch: int) -> dict[bool, StepCost]:
  """{remat: StepCost}. With remat the backward recomputes one decoder layer at a time, so its
  transient grows by one layer's share of what remat saved."""
  costs = {r: step_cost(dataclasses.replace(pp, model=pp.model.clone(remat=r)), config, image_size, seq_len, batch)
           for r in (False, True)}
  saved = max(0, costs[False].activation_bytes - costs[True].activation_bytes)
  costs[True].transient_bytes += saved // pp.model.config.text.num_hidden_layers
  return costs


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Choice:
  slice: str
  chips: int
  mesh: dict
  remat: bool
  micro_batch: int  # samples per device per micro-batch
  accum: int  # micro-batches per update
  bytes: dict  # per-device bytes by kind
  step_s: float
  fits: bool


def total_bytes(state: dict, cost: StepCost, mesh_shape: dict, micro_batch: int, cost_batch: int) -> dict:
  """Per-device bytes of one configuration; activations scale linearly from the traced batch."""
  n = math.prod(mesh_shape.values())
  scale = micro_batch / cost_batch
  return dict(state, activations=int(cost.activation_bytes * scale),
              weight_residuals=int(cost.weight_residual_bytes / n),
              transient=int(cost.transient_bytes * scale))


def mesh_candidates(chips: int, kv_heads: int) -> list[dict]:
  out = [{"data": 1, "fsdp": chips, "tensor": 1}]
  for t in (2, 4, 8):
    if chips % t == 0 and kv_heads % t == 0 and chips > t:
      out.append({"data": 1, "fsdp": chips // t, "tensor": t})
  return out


def choose(slice_name, chip: Chip, chips: int, global_batch: int, pp: ParamPlan,
           costs: dict[bool, StepCost], cost_batch: int, mfu: float, headroom: float = 0.9) -> Choice:
  """Fewest FLOPs first (no remat), then the least tensor parallelism, then the largest micro-batch."""
  budget = chip.hbm_gib * GiB * headroom
  kv = pp.model.config.text.num_key_value_heads
  best = None
  for remat in (False, True):
    for mesh_shape in mesh_candidates(chips, kv):
      states = {acc: state_bytes_per_device(pp, mesh_shape, acc) for acc in (False, True)}
      shards = mesh_shape["data"] * mesh_shape["fsdp"]
      per_device = global_batch // shards if global_batch % shards == 0 else 0
      for mb in (32, 16, 8, 4, 2, 1):
        if not per_device or per_device % mb:
          continue
        b = total_bytes(states[per_device // mb > 1], costs[remat], mesh_shape, mb, cost_batch)
        flops = costs[remat].flops / cost_batch * global_batch
        step_s = flops / (chips * chip.peak_tflops * 1e12 * mfu)
        c = Choice(slice_name, chips, mesh_shape, remat, mb, per_device // mb, b, step_s,
                   sum(b.values()) <= budget)
        if c.fits:
          return c
        if best is None or sum(b.values()) < sum(best.bytes.values()):
          best = c
  return best


def stage_config(stage: int, preset: str):
  from configs import stage1, stage2
  return (stage1 if stage == 1 else stage2).get_config(preset)


def plan(presets: Sequence[str], stages: Sequence[int], image_size, seq_len: int, mfu: float,
         slices=SLICES, cost_batch: int = 1):
  """Yields (preset, stage, ParamPlan, {remat: StepCost}, [Choice per slice])."""
  for preset in presets:
    for stage in stages:
      config = stage_config(stage, preset)
      pp = param_plan(config)
      costs = step_costs(pp, config, image_size, seq_len, cost_batch)
      choices = [choose(name, CHIPS[chip], n, config.train.global_batch, pp, costs, cost_batch, mfu)
                 for name, chip, n in slices]
      yield preset, stage, config, pp, costs, choices


def _g(x):
  return f"{x / GiB:.2f}"


STATE_MESHES = (("replicated", {"data": 1, "fsdp": 1, "tensor": 1}),
                ("FSDP 8", {"data": 1, "fsdp": 8, "tensor": 1}),
                ("FSDP 64", {"data": 1, "fsdp": 64, "tensor": 1}),
                ("FSDP 16 x TP 4", {"data": 1, "fsdp": 16, "tensor": 4}))


def format_report(rows, image_size, seq_len, mfu) -> str:
  """Three markdown tables: parameters/state per sharding, activations and FLOPs, the chosen mesh per slice."""
  rows = list(rows)
  tokens = (image_size[0] // 32) * (image_size[1] // 32)
  out = [f"Per sample: image {image_size[0]}x{image_size[1]} = {tokens} image tokens, sequence padded to {seq_len} "
         f"tokens. GiB per device. Parameters stored fp32 (4 B each); gradients (2 x fp32 = 8 B: "
         f"accumulator + current micro-batch; 4 B without accumulation) and AdamW moments (8 B) only for trainable parameters. Throughput at an assumed {mfu:.0%} MFU.", ""]
  out.append("| preset | stage | params (B) | trainable (B) | "
             + " | ".join(f"params+grads+opt, {label}" for label, _ in STATE_MESHES) + " |")
  out.append("|---|---|---|---|" + "---|" * len(STATE_MESHES))
  for preset, stage, config, pp, costs, choices in rows:
    c = pp.counts
    cells = []
    for _, ms in STATE_MESHES:
      st = state_bytes_per_device(pp, ms)
      cells.append(f"{_g(st['params'])} + {_g(st['grads'])} + {_g(st['opt'])}")
    out.append(f"| {preset} | {stage} | {c['total'] / 1e9:.3f} | {c['trainable'] / 1e9:.3f} | " + " | ".join(cells) + " |")
  out += ["", "| preset | stage | saved activations / sample, remat off / on | weight residuals (unsharded), off / on "
          "| transient / sample, off / on | TFLOPs / sample, off / on |", "|---|---|---|---|---|---|"]
  for preset, stage, config, pp, costs, choices in rows:
    f, t = costs[False], costs[True]
    out.append(f"| {preset} | {stage} | {_g(f.activation_bytes)} / {_g(t.activation_bytes)} | "
               f"{_g(f.weight_residual_bytes)} / {_g(t.weight_residual_bytes)} | {_g(f.transient_bytes)} / "
               f"{_g(t.transient_bytes)} | {f.flops / 1e12:.1f} / {t.flops / 1e12:.1f} |")
  out += ["", "| preset | stage | slice (chips, HBM GiB) | mesh data,fsdp,tensor | remat | per-device micro-batch x "
          "accumulation | state GiB | activations+transient GiB | total GiB | fits | step s | samples/s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for preset, stage, config, pp, costs, choices in rows:
    for (name, chip, n), ch in zip(SLICES, choices):
      if ch is None:
        out.append(f"| {preset} | {stage} | {name} ({n}, {CHIPS[chip].hbm_gib:g}) | global batch "
                   f"{config.train.global_batch} does not split | | | | | | | | |")
        continue
      b = ch.bytes
      st = b["params"] + b["grads"] + b["opt"] + b["weight_residuals"]
      act = b["activations"] + b["transient"]
      m = ch.mesh
      out.append(f"| {preset} | {stage} | {name} ({n}, {CHIPS[chip].hbm_gib:g}) | {m['data']},{m['fsdp']},{m['tensor']} | "
                 f"{'on' if ch.remat else 'off'} | {ch.micro_batch} x {ch.accum} | {_g(st)} | {_g(act)} | "
                 f"{_g(st + act)} | {'yes' if ch.fits else 'NO'} | {ch.step_s:.1f} | "
                 f"{config.train.global_batch / ch.step_s:.0f} |")
  return "\n".join(out)


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default="paper_4b,paper_8b")
  p.add_argument("--stages", default="1,2")
  p.add_argument("--image_size", default="1152,1152", help="H,W of the bucket (1152x1152 = 1296 image tokens)")
  p.add_argument("--seq_len", type=int, default=1408, help="padded sequence length (image tokens + text)")
  p.add_argument("--mfu", type=float, default=0.40)
  a = p.parse_args(argv)
  image_size = tuple(int(x) for x in a.image_size.split(","))
  rows = plan(a.presets.split(","), [int(s) for s in a.stages.split(",")], image_size, a.seq_len, a.mfu)
  rows = list(rows)
  print(format_report(rows, image_size, a.seq_len, a.mfu))


if __name__ == "__main__":
  main()
