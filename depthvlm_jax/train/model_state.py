"""A run's train state: parameters created, loaded or restored straight onto their shards, and the jitted step."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
from etils import epath

from depthvlm_jax import sharding
from depthvlm_jax.model.config import ConfigError
from depthvlm_jax.model.depthvlm import DepthVLM, depth_head_init, depthvlm_dummy_inputs
from depthvlm_jax.model.hf_checkpoint import load_qwen3_vl
from depthvlm_jax.model.hub import resolve_model_dir
from depthvlm_jax.model import lora
from depthvlm_jax.runs import checkpoints, freeze
from depthvlm_jax.runs.model_from_config import DTYPES, params_like
from depthvlm_jax.train import distributed
from depthvlm_jax.processing.device_patches import processor_for
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.train.data import micro_batches, to_global
from depthvlm_jax.train.step import initial_state, make_train_programs, row_counts, zero_accumulator

log = logging.getLogger(__name__)


def _cast_like(params, like):
  return jax.tree.map(lambda x, t: x.astype(t.dtype), params, like)


def initial_params(config, model: DepthVLM, like, rng):
  """The parameters a new run starts from, each created or read straight onto the sharding and in
  the dtype of its entry in `like` (see `params_like`):

  * `model_init` (previous stage): that run's newest checkpoint, restored with `like` as target;
    nothing random is built.
  * `model.hf_dir`: the Qwen3-VL backbone streamed from the safetensors files and a fresh depth head
    (only the head is initialised).
  * otherwise (tiny): the whole model at random.

  With LoRA (`train.lora_rank` > 0), the first two start fresh adapters (`lora.init_adapters`) on
  the loaded weights.
  """
  like_base, like_adapters = lora.split_adapters(like)
  if like_adapters and (config.model_init or config.model.hf_dir):  # LoRA on loaded weights: fresh adapters
    base = initial_params(config, model, like_base, rng)
    return freeze.merge_params(lora.init_adapters(like_adapters, jax.random.fold_in(rng, 1)), base)
  shardings = jax.tree.map(lambda x: x.sharding, like)
  if config.model_init:
    try:
      trainable, frozen = checkpoints.restore_params(config.model_init, like)
    except checkpoints.ParamTreeMismatchError as e:
      raise ConfigError(f"model_init={config.model_init!r}: parameter tree does not match this model ({e})") from None
    return freeze.merge_params(trainable, frozen)
  if config.model.hf_dir:  # pretrained backbone, fresh depth head
    head = jax.jit(lambda r: _cast_like(depth_head_init(model, r), {"depth_head": like["depth_head"]}),
                   out_shardings={"depth_head": shardings["depth_head"]})(rng)
    backbone_like = {k: v for k, v in like.items() if k != "depth_head"}
    _, backbone = load_qwen3_vl(resolve_model_dir(config.model.hf_dir), DTYPES[config.model.param_dtype],
                                jax.tree.map(lambda x: x.sharding, backbone_like), other_prefixes=("depth_head.",),
                                dtypes=jax.tree.map(lambda x: x.dtype, backbone_like))
    return dict(backbone, **head)
  init = jax.jit(lambda r: _cast_like(nn.unbox(model.init(r, **depthvlm_dummy_inputs(model.config))["params"]), like),
                 out_shardings=shardings)
  return init(rng)


def abstract_state(optimizer, trainable_like, mesh) -> dict[str, Any]:
  """The train state as ShapeDtypeStructs with the shardings the run keeps it in: params and
  optimizer moments sharded like the trainable parameters, step and counters replicated."""
  replicated = sharding.activation_sharding(mesh)
  opt_like = checkpoints.optimizer_state_like(optimizer, trainable_like, mesh)
  state = jax.eval_shape(initial_state, trainable_like, opt_like)
  return {k: v if k in ("params", "opt_state") else jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
          for k, v in dict(state, params=trainable_like, opt_state=opt_like).items()}


def restore_or_initialise(config, model: DepthVLM, mesh, workdir: epath.Path, optimizer, data_iter):
  """(start step or None, train state, frozen params, checkpoint manager) of a run in `workdir`.

  Its own newest intact checkpoint (damaged newer steps set aside), else `resume` (another run's
  checkpoint, iterator included), else `initial_params`. Restores read every array onto its
  target shards; a new run (not one continuing its own checkpoints) writes its frozen parameters
  once, to `<workdir>/frozen_params`, before its first step.
  """
  like, mask = params_like(config, model, mesh)
  trainable_like, frozen_like = freeze.split_params(like, mask)
  state_like = abstract_state(optimizer, trainable_like, mesh)
  mgr = checkpoints.manager(workdir / "checkpoints", config.keep_ckpts)
  if checkpoints.agreed_steps(mgr):  # process 0's listing: every process takes the same branch
    start, state, frozen, damaged = checkpoints.restore_latest(mgr, state_like, frozen_like, data_iter)
    if damaged and distributed.is_main():
      moved = checkpoints.set_aside(mgr, damaged, workdir / "checkpoints_damaged")
      log.warning("damaged checkpoint step(s) %s moved to %s; resuming from step %d", damaged,
                  ", ".join(map(str, moved)), start)
    distributed.barrier("checkpoint_fallback")
    if damaged and not distributed.is_main():
      mgr.reload()
    if not checkpoints.frozen_path(mgr.directory).is_dir():  # steps of an earlier version, frozen params in each
      checkpoints.save_frozen(workdir, frozen)
    return start, state, frozen, mgr
  if config.resume:
    rmgr = checkpoints.manager(epath.Path(config.resume) / "checkpoints", config.keep_ckpts)
    _, state, frozen, _ = checkpoints.restore_latest(rmgr, state_like, frozen_like, data_iter)
  else:
    trainable, frozen = freeze.split_params(initial_params(config, model, like, jax.random.key(config.train.seed)), mask)
    opt_state = jax.jit(optimizer.init, out_shardings=jax.tree.map(lambda x: x.sharding, state_like["opt_state"]))(
        trainable)
    state = initial_state(trainable, opt_state)
    state = {k: v if k in ("params", "opt_state") else jax.device_put(v, state_like[k].sharding)
             for k, v in state.items()}
  checkpoints.save_frozen(workdir, frozen)
  return None, state, frozen, mgr


def train_processor(config, model: DepthVLM) -> ImageProcessorConfig:
  """The processor whose normalisation the train step applies to uint8 pixels: the checkpoint's
  (`model.hf_dir`), at the model's patch geometry."""
  base = ImageProcessorConfig.from_hf_dir(config.model.hf_dir) if config.model.hf_dir else ImageProcessorConfig()
  return processor_for(model.config.vision, base)


@dataclasses.dataclass
class TrainPrograms:
  """One bucket's update as the trainer runs it: `zeros`, then `accumulate` once per micro-batch,
  then `apply` (see `step.make_train_programs`). Each is jitted (or compiled ahead of time); `apply`
  does not depend on the bucket and is shared by the buckets of a run."""

  accumulate: Any
  apply: Any
  zeros: Any  # () -> a zero accumulator on the trainable params' shardings
  micro_batches: int
  depth_grid: tuple[int, int]
  merge: int  # the vision tower's spatial merge size
  with_lm: bool
  micro_bytes: int = 0  # per-device bytes of one micro-batch (set once compiled, for the peak)

  def __call__(self, state, frozen, batch: dict[str, Any], mesh, shard: distributed.DataShard):
    """One update from this process's rows of a global batch (host arrays): (state, metrics).

    The denominators of the whole batch are counted on the host (`step.row_counts`, summed on the
    devices); micro-batch i is rows i, i + K, i + 2K, ... of this process's rows (the rows of the
    one-program step's micro-batch i), transferred when the loop reaches it. At most two micro-batches
    are on the devices at once: the next is transferred while the current one runs, and the loop waits
    for that one to finish before queuing another.
    """
    counts = to_global(row_counts(batch, self.depth_grid, self.merge, self.with_lm), mesh, shard)
    acc, running = self.zeros(), None
    for micro in micro_batches(batch, mesh, shard, self.micro_batches):
      if running is not None:
        jax.block_until_ready(running)
      acc = self.accumulate(state, frozen, acc, micro, counts)
      running = acc["terms"]["depth_count"]
    return self.apply(state, frozen, acc)


def accumulator_like(state, mesh) -> dict[str, Any]:
  """The gradient accumulator of `state` (concrete or abstract) as abstract arrays with the shardings
  the programs keep it in: float32 gradients sharded like the trainable params, replicated loss terms."""
  replicated = sharding.activation_sharding(mesh)
  acc = jax.eval_shape(zero_accumulator, state["params"])
  return {"grads": jax.tree.map(lambda a, p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=p.sharding),
                                acc["grads"], state["params"]),
          "terms": {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in acc["terms"].items()}}


def jit_train_programs(config, model: DepthVLM, optimizer, mesh, state, depth_grid: tuple[int, int],
                       apply=None, target: str | None = None) -> TrainPrograms:
  """The jitted, donated programs of one update that the trainer runs (and `depthvlm_jax.aot` compiles
  for a slice). state: the train state, concrete or abstract (shapes and shardings are read);
  apply: another bucket's, to share.

  Fixed shardings in and out: step 2 reuses step 1's programs instead of compiling again. The
  compile target is the platform of the mesh's devices (a TPU slice compiled from a CPU host is TPU),
  or `target` ("tpu", "gpu") when given: the programs that platform gets (kernels, layouts), run on
  the mesh's own devices; the tests run the accelerators' programs on CPU devices so.
  """
  accumulate, apply_fn = make_train_programs(model, optimizer, depth_grid, config.train.depth_loss_weight,
                                             with_lm=config.stage == 2, lm_positions=config.train.lm_positions,
                                             processor=train_processor(config, model))
  replicated = sharding.activation_sharding(mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  acc_shardings = {"grads": state_shardings["params"], "terms": replicated}
  # keep_unused: the optimizer moments (accumulate), the frozen weights (apply, and the LM head a stage-1
  # step does not read) stay arguments, as they stay resident in HBM, so the compiled argument bytes
  # are what the devices hold. The accumulator is donated to each `accumulate`, the state to `apply`.
  # Traced under the mesh: the model's activation constraints keep every row on its batch shard, the
  # model sees its platform (`sharding.compile_target`) and lays the fused attention kernels out over its axes.
  acc_jit = jax.jit(sharding.in_mesh(accumulate, mesh, target), donate_argnums=(2,), keep_unused=True,
                    out_shardings=acc_shardings)
  if apply is None:
    apply = jax.jit(sharding.in_mesh(apply_fn, mesh, target), donate_argnums=(0,), keep_unused=True,
                    out_shardings=(state_shardings, replicated))
  params_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])
  zeros = jax.jit(lambda: zero_accumulator(params_like), out_shardings=acc_shardings)
  return TrainPrograms(acc_jit, apply, zeros, config.train.micro_batches, depth_grid,
                       model.config.vision.spatial_merge_size, config.stage == 2)
