"""orbax checkpoints holding the train state, the frozen parameters and the grain iterator together.

orbax writes each step into a temporary directory and renames it when complete, so a kill leaves
either the previous checkpoint or the new one, never a half-written one. Saves are asynchronous;
the last `keep` steps are kept. Restoring takes target shardings, so a checkpoint written on one
mesh restores onto another.

A damaged step (a truncated or missing array file, e.g. a disk that filled up or a copy cut short)
does not stop a run: restoring falls back to the newest step that restores completely and logs which
steps it skipped and why.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import pathlib
import shutil
import sys
from typing import Any, Callable

import grain
import jax
import optax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class NoIntactCheckpointError(RuntimeError):
  """Every checkpoint step in a directory failed to restore (message lists each step's error)."""


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


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  first = (lines[0] if lines else "").split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {first}"[:300]


class _UnretrievedReadErrors(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" reports of orbax's array reads."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not (text.startswith("Task exception was never retrieved") and "async_deserialize" in text)


@contextlib.contextmanager
def _quiet_failed_reads():
  """Keeps a failed restore down to the one error the caller reports.

  orbax reads arrays in concurrent asyncio tasks; when one fails, the others' failures are never
  retrieved and asyncio logs a traceback for each. The reads still in flight then finish on
  TensorStore's threads and try to wake orbax's event loop, already closed; that RuntimeError
  reaches sys.unraisablehook. Both kinds (and only those) are dropped.
  """
  if not getattr(sys.unraisablehook, "drops_closed_loop_errors", False):  # installed once, stays: reads end late
    previous = sys.unraisablehook

    def hook(unraisable):
      if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook
  logger = logging.getLogger("asyncio")
  quiet = _UnretrievedReadErrors()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    gc.collect()  # the failed reads' tasks are reported (and dropped) now, while the filter is on
    logger.removeFilter(quiet)


def _newest_intact(mgr: ocp.CheckpointManager, restore_step: Callable[[int], Any]) -> tuple[int, Any, list[int]]:
  """(step, restore_step(step), damaged newer steps) for the newest step that restores.

  Raises NoIntactCheckpointError naming the directory and each step's error when none restores.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      with _quiet_failed_reads():
        out = restore_step(step)
    except Exception as e:  # orbax/TensorStore raise many types for a damaged file: any failure means skip
      errors.append((step, _first_line(e)))
      log.warning("checkpoint step %d in %s cannot be restored (%s); trying the previous step",
                  step, mgr.directory, errors[-1][1])
      continue
    if errors:
      log.warning("restored step %d from %s; skipped damaged step(s) %s", step, mgr.directory,
                  ", ".join(str(s) for s, _ in errors))
    return step, out, [s for s, _ in errors]
  detail = "; ".join(f"step {s}: {m}" for s, m in errors) or "no checkpoint steps"
  raise NoIntactCheckpointError(f"{mgr.directory}: no checkpoint could be restored ({detail})")


def restore(mgr: ocp.CheckpointManager, step: int, state_like: Any, frozen_like: Any, data_iter: Any | None):
  """Restores (state, frozen) of `step` with the shardings of the `*_like` trees; restores `data_iter` in place."""
  items = {"state": ocp.args.StandardRestore(_abstract(state_like)),
           "frozen": ocp.args.StandardRestore(_abstract(frozen_like))}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  out = mgr.restore(step, args=ocp.args.Composite(**items))
  return out["state"], out["frozen"]


def restore_latest(mgr: ocp.CheckpointManager, state_like: Any, frozen_like: Any, data_iter: Any | None):
  """`restore` of the newest intact step: (step, state, frozen, damaged newer steps skipped)."""
  step, (state, frozen), damaged = _newest_intact(
      mgr, lambda s: restore(mgr, s, state_like, frozen_like, data_iter))
  return step, state, frozen, damaged


def set_aside(mgr: ocp.CheckpointManager, steps: list[int], destination: pathlib.Path) -> list[pathlib.Path]:
  """Moves damaged step directories out of the manager's directory (kept, never deleted).

  A resumed run would otherwise meet them again when it reaches those steps. Returns the new paths.
  """
  moved = []
  for step in steps:
    src = pathlib.Path(mgr.directory) / str(step)
    if not src.exists():
      continue
    destination.mkdir(parents=True, exist_ok=True)
    dst = destination / str(step)
    n = 1
    while dst.exists():
      dst, n = destination / f"{step}.{n}", n + 1
    shutil.move(str(src), str(dst))
    moved.append(dst)
  mgr.reload()
  return moved


def restore_params(workdir: str | pathlib.Path) -> tuple[Any, Any]:
  """(trainable, frozen) parameter trees of the newest intact checkpoint in another run's workdir."""
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no checkpoint directory (expected the workdir of a finished run)")
  mgr = ocp.CheckpointManager(directory, item_names=("state", "frozen", "data"))
  if mgr.latest_step() is None:
    raise FileNotFoundError(f"{directory}: no checkpoint (expected the workdir of a finished run)")
  _, out, _ = _newest_intact(mgr, lambda step: mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), frozen=ocp.args.StandardRestore())))
  return out["state"]["params"], out["frozen"]
