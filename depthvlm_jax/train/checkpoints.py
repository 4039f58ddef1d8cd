"""orbax checkpoints holding the train state, the frozen parameters and the grain iterator together.

orbax writes each step into a temporary directory and renames it when complete, so a kill leaves
either the previous checkpoint or the new one, never a half-written one. Saves are asynchronous;
the last `keep` steps are kept. Restoring takes target shardings, so a checkpoint written on one
mesh restores onto another.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import optax
import orbax.checkpoint as ocp


def manager(directory: str | pathlib.Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save interrupted by a kill leaves an unfinished temporary directory,
  # never a step directory; it is deleted when the next run opens the manager.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                               item_names=("state", "frozen", "data"))


def save(mgr: ocp.CheckpointManager, step: int, state: Any, frozen: Any, data_iter: Any | None) -> None:
  items = {"state": ocp.args.StandardSave(state), "frozen": ocp.args.StandardSave(frozen)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mgr.save(step, args=ocp.args.Composite(**items))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def optimizer_state_like(optimizer: optax.GradientTransformation, params_like: Any, mesh: jax.sharding.Mesh) -> Any:
  """ShapeDtypeStructs of `optimizer.init(params)` sharded like the params (scalars replicated).

  Restore targets and `jit(init, out_shardings=...)` need these: `jax.eval_shape` drops shardings,
  and jit places the zero-initialised moments replicated, so without them an FSDP run would hold
  a full optimizer state on every device.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.eval_shape(optimizer.init, params_like)
  return optax.tree_map_params(
      optimizer, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding), abstract, params_like,
      transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated))


def restore(mgr: ocp.CheckpointManager, step: int, state_like: Any, frozen_like: Any, data_iter: Any | None):
  """Restores (state, frozen) with the shardings of the `*_like` trees; restores `data_iter` in place."""
  items = {"state": ocp.args.StandardRestore(_abstract(state_like)),
           "frozen": ocp.args.StandardRestore(_abstract(frozen_like))}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  out = mgr.restore(step, args=ocp.args.Composite(**items))
  return out["state"], out["frozen"]


def restore_params(workdir: str | pathlib.Path) -> tuple[Any, Any]:
  """(trainable, frozen) parameter trees of the latest checkpoint in another run's workdir."""
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  mgr = ocp.CheckpointManager(directory, item_names=("state", "frozen", "data"))
  step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint (expected the workdir of a finished run)")
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                  frozen=ocp.args.StandardRestore()))
  return out["state"]["params"], out["frozen"]
