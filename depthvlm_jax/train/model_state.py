"""A run's train state: parameters created, loaded or restored straight onto their shards, and the jitted step."""

from __future__ import annotations

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
from depthvlm_jax.train.step import initial_state, make_train_step

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


def jit_train_step(config, model: DepthVLM, optimizer, mesh, state_shardings, depth_grid: tuple[int, int],
                   target: str | None = None):
  """The jitted, donated train step the trainer runs (and `depthvlm_jax.aot` compiles for a slice).

  Fixed state shardings in and out: step 2 reuses step 1's program instead of compiling again. The
  compile target is the platform of the mesh's devices (a TPU slice compiled from a CPU host is TPU),
  or `target` ("tpu", "gpu") when given: the program that platform gets (kernels, micro-batch
  loop), run on the mesh's own devices; the tests run the accelerators' step on CPU devices so.
  """
  platform = target or mesh.devices.flat[0].platform
  step_fn = make_train_step(model, optimizer, depth_grid, config.train.micro_batches,
                            config.train.depth_loss_weight, with_lm=config.stage == 2,
                            lm_positions=config.train.lm_positions, platform=platform,
                            processor=train_processor(config, model))
  # keep_unused: frozen weights a stage does not read (the LM head in stage 1) stay arguments, as they
  # stay resident in HBM, so the compiled argument bytes are what the devices hold.
  # Traced under the mesh: the model's activation constraints keep every row on its batch shard, the
  # model sees its platform (`sharding.compile_target`) and lays the fused attention kernels out over its axes.
  return jax.jit(sharding.in_mesh(step_fn, mesh, target), donate_argnums=(0,), keep_unused=True,
                 out_shardings=(state_shardings, sharding.activation_sharding(mesh)))
