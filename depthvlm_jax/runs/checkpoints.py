"""orbax checkpoints: per step the train state and the grain iterator; the frozen parameters once per run.

A step holds what changes while training: the trainable parameters, the optimizer state, the step
and non-finite counters, and the grain iterator. The frozen parameters (in stage 1 the whole
backbone, most of the model's bytes) never change, so they are written once, when the run
starts, to `<workdir>/frozen_params` (FROZEN_DIR), and every step of the run restores with them.
Steps written by earlier versions, which hold a `frozen` item of their own, still restore.

orbax writes each step into a temporary directory and renames it when complete, so a kill leaves
either the previous checkpoint or the new one, never a half-written one. Saves are asynchronous;
the last `keep` steps are kept. The frozen parameters are written the same way (temporary directory,
then rename). Restoring takes abstract targets (shape, dtype and sharding per array), so every process
reads its own shards straight onto its devices, a checkpoint written on one mesh restores onto
another, and a float32 array restores as bfloat16 when the target asks for it.

A damaged step (a truncated or missing array file, e.g. a disk that filled up or a copy cut short)
does not stop a run: restoring falls back to the newest step that restores completely and logs which
steps it skipped and why. With several processes the choice is made once for all of them: the
candidate steps are process 0's listing, broadcast, and a step counts as restored only when it
restored on every process, so a read error on one host makes all fall back to the same step.

Every path may be local or an object-store prefix (`gs://bucket/run/checkpoints`): paths are
`etils.epath` paths, which orbax and TensorStore read and write either way.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import pathlib
import sys
from typing import Any, Callable

import grain
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax.traverse_util import flatten_dict as flatten, unflatten_dict as unflatten
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)
FROZEN_DIR = "frozen_params"  # in the workdir, next to checkpoints/


def absolute(path: str | pathlib.Path) -> epath.Path:
  """`path` as an epath: a local one made absolute; an object-store one (gs://...) as given."""
  p = epath.Path(path)
  return p if "://" in str(path) else p.absolute()


class NoIntactCheckpointError(RuntimeError):
  """Every checkpoint step in a directory failed to restore (message lists each step's error)."""


class FrozenParamsError(NoIntactCheckpointError):
  """The run's `frozen_params` folder, which every step restores with, cannot be read."""


class ParamTreeMismatchError(ValueError):
  """A checkpoint's parameter paths differ from the target's (message names the first differences)."""


def manager(directory: str | pathlib.Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  # "frozen" stays an item name so that steps of earlier versions (frozen parameters in every step) restore.
  # cleanup_tmp_directories: a save interrupted by a kill leaves an unfinished temporary directory,
  # never a step directory; it is deleted when the next run opens the manager.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(absolute(directory), options=options,
                               item_names=("state", "frozen", "data"))


def save(mgr: ocp.CheckpointManager, step: int, state: Any, frozen: Any | None, data_iter: Any | None) -> None:
  """Saves `step` asynchronously. frozen=None (the trainer): the step relies on the run's `save_frozen`."""
  items = {"state": ocp.args.StandardSave(state)}
  if frozen is not None:
    items["frozen"] = ocp.args.StandardSave(frozen)
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
  reaches sys.unraisablehook. Both kinds (and only those: unretrieved `async_deserialize` failures,
  "Event loop is closed") are dropped, from the first restore on; the restore itself still raises.
  """
  if not getattr(sys.unraisablehook, "drops_closed_loop_errors", False):  # installed once, stays: reads end late
    previous = sys.unraisablehook

    def hook(unraisable):
      if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook
  # Installed once, stays: a failed read's task can be collected (and reported) after the restore
  # returned, when TensorStore's threads let go of it (seen in CI as a stray traceback).
  logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _UnretrievedReadErrors) for f in logger.filters):
    logger.addFilter(_UnretrievedReadErrors())
  try:
    yield
  finally:
    gc.collect()  # report (and drop) the failed reads' tasks now where possible


def agreed_steps(mgr: ocp.CheckpointManager) -> list[int]:
  """The manager's steps, newest first, as process 0 lists them (broadcast to every process)."""
  steps = sorted(mgr.all_steps(), reverse=True)
  if jax.process_count() == 1:
    return steps
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  mine = np.zeros(n, np.int32)
  mine[:min(n, len(steps))] = steps[:n]
  return [int(s) for s in np.asarray(multihost_utils.broadcast_one_to_all(mine)).reshape(-1)]


def _restored_everywhere(ok: bool) -> bool:
  """True if every process restored the step (a cross-process all-gather of the flags)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def _newest_intact(mgr: ocp.CheckpointManager, restore_step: Callable[[int], Any],
                   reraise: tuple[type[BaseException], ...] = ()) -> tuple[int, Any, list[int]]:
  """(step, restore_step(step), damaged newer steps) for the newest step that restores.

  Raises NoIntactCheckpointError naming the directory and each step's error when none restores;
  exceptions of the `reraise` types are not damage and propagate at once.
  """
  errors = []
  for step in agreed_steps(mgr):
    error = None
    try:
      with _quiet_failed_reads():
        out = restore_step(step)
    except reraise:
      raise
    except Exception as e:  # orbax/TensorStore raise many types for a damaged file: any failure means skip
      error = _first_line(e)
    if not _restored_everywhere(error is None):
      errors.append((step, error or f"failed on another process than {jax.process_index()}"))
      log.debug("checkpoint step %d in %s cannot be restored (%s); trying the previous step",
                step, mgr.directory, errors[-1][1])
      continue
    if errors:  # one line: which step is used and why
      log.warning("checkpoint step%s %s in %s cannot be restored (%s); using step %d, the newest intact one",
                  "s" if len(errors) > 1 else "", ", ".join(str(s) for s, _ in errors), mgr.directory,
                  "; ".join(f"step {s}: {m}" for s, m in errors), step)
    return step, out, [s for s, _ in errors]
  detail = "; ".join(f"step {s}: {m}" for s, m in errors) or "no checkpoint steps"
  raise NoIntactCheckpointError(f"{mgr.directory}: no checkpoint could be restored ({detail})")


def frozen_path(ckpt_directory: str | pathlib.Path) -> epath.Path:
  """Where the run whose steps live in `ckpt_directory` (<workdir>/checkpoints) keeps its frozen parameters."""
  return absolute(ckpt_directory).parent / FROZEN_DIR


FROZEN_SAVE_CONCURRENT_GB = 1


def save_frozen(workdir: str | pathlib.Path, frozen: Any) -> epath.Path:
  """Writes the run's frozen parameters to `<workdir>/frozen_params` (replacing any), synchronously.

  Called once when a run starts (before its first step is saved). orbax writes a temporary
  directory and renames it when every process has finished, so a kill leaves no partial copy; a
  run killed before its first step starts afresh and writes them again.
  """
  path = absolute(workdir) / FROZEN_DIR
  # At most FROZEN_SAVE_CONCURRENT_GB of arrays in flight to host memory: orbax's default is large
  # enough to copy a whole 4B backbone to the host at once, on top of the model already there.
  handler = ocp.StandardCheckpointHandler(save_concurrent_gb=FROZEN_SAVE_CONCURRENT_GB)
  with ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(path, ocp.args.StandardSave(frozen), force=True)  # synchronous
  return path


def _frozen_in_step(step_dir: epath.Path) -> bool:
  return (step_dir / "frozen").is_dir()


def restore_frozen(ckpt_directory: str | pathlib.Path, frozen_like: Any) -> Any:
  """The frozen parameters of the run whose steps live in `ckpt_directory`, as `frozen_like` asks."""
  path = frozen_path(ckpt_directory)
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: missing; the checkpoints in {ckpt_directory} hold only the trainable state "
                            f"and restore with the frozen parameters the run wrote there when it started")
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, _abstract(frozen_like))


def restore(mgr: ocp.CheckpointManager, step: int, state_like: Any, frozen_like: Any, data_iter: Any | None):
  """Restores (state, frozen) of `step` as the `*_like` trees ask (shapes, dtypes, shardings);
  restores `data_iter` in place. frozen comes from the run's `frozen_params` (or from a step of an
  earlier version that holds its own)."""
  in_step = _frozen_in_step(epath.Path(mgr.directory) / str(step))
  items = {"state": ocp.args.StandardRestore(_abstract(state_like))}
  if in_step:
    items["frozen"] = ocp.args.StandardRestore(_abstract(frozen_like))
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  out = mgr.restore(step, args=ocp.args.Composite(**items))
  return out["state"], out["frozen"] if in_step else restore_frozen(mgr.directory, frozen_like)


def restore_latest(mgr: ocp.CheckpointManager, state_like: Any, frozen_like: Any, data_iter: Any | None):
  """`restore` of the newest intact step: (step, state, frozen, damaged newer steps skipped)."""
  step, (state, frozen), damaged = _newest_intact(
      mgr, lambda s: restore(mgr, s, state_like, frozen_like, data_iter))
  return step, state, frozen, damaged


def set_aside(mgr: ocp.CheckpointManager, steps: list[int], destination: str | pathlib.Path) -> list[epath.Path]:
  """Moves damaged step directories out of the manager's directory (kept, never deleted).

  A resumed run would otherwise meet them again when it reaches those steps. A local step is
  renamed; on an object store, which has no directory rename, each of its objects is copied to
  the destination and the step is then deleted. Returns the new paths.
  """
  destination = epath.Path(destination)
  moved = []
  for step in steps:
    src = epath.Path(mgr.directory) / str(step)
    if not src.exists():
      continue
    destination.mkdir(parents=True, exist_ok=True)
    dst = destination / str(step)
    n = 1
    while dst.exists():
      dst, n = destination / f"{step}.{n}", n + 1
    if "://" in str(src):
      for f in src.rglob("*"):
        if not f.is_dir():
          target = dst / f.relative_to(src)
          target.parent.mkdir(parents=True, exist_ok=True)
          f.copy(target)
      src.rmtree()
    else:
      src.rename(dst)
    moved.append(dst)
  mgr.reload()
  return moved


def _restore_subtree(path: epath.Path, like: Any, key: str | None = None) -> Any:
  """The arrays of `like` (a nested dict of ShapeDtypeStructs with shardings) from the orbax tree at
  `path` (under its top-level `key` if given), each read straight into its target shards and cast
  to its target dtype; the checkpoint's other arrays are not read."""
  item = {key: like} if key else like
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), item)
  out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  return out[key] if key else out


@contextlib.contextmanager
def _reading_frozen(path):
  """Turns a failure to read the run's shared `frozen_params` folder into FrozenParamsError naming it
  (every step restores with that folder, so falling back to an older step cannot help)."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 -- any failure to read it means the folder is damaged
    raise FrozenParamsError(f"{path}: the run's frozen parameters cannot be read ({_first_line(e)}); every "
                            f"checkpoint step restores with this folder: restore it from a copy of the run") from None


def _stored_paths(path: epath.Path, key: str | None = None) -> set[tuple[str, ...]]:
  meta = ocp.PyTreeCheckpointer().metadata(path)
  meta = getattr(meta, "item_metadata", meta)  # a directory written by a Checkpointer carries step metadata
  tree = getattr(meta, "tree", meta)
  return set(flatten(tree[key] if key else tree))


def restore_params(workdir: str | pathlib.Path, like: Any | None = None) -> tuple[Any, Any]:
  """(trainable, frozen) parameter trees of the newest intact checkpoint in another run's workdir.

  like: None = host arrays as stored (the whole trees). Otherwise the abstract parameters of the
    model to start (nested dict of ShapeDtypeStructs with shardings, e.g. `model_from_config.params_like`):
    every array is read straight onto its target shards in its target dtype (no host copy of the
    model, works when arrays span processes), the other run's optimizer state is not read, and a
    parameter tree that differs from `like` raises ParamTreeMismatchError naming the paths. The split
    is the other run's: its trainable and frozen parameters.
  """
  directory = absolute(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no checkpoint directory (expected the workdir of a finished run)")
  mgr = ocp.CheckpointManager(directory, item_names=("state", "frozen", "data"))
  if mgr.latest_step() is None:
    raise FileNotFoundError(f"{directory}: no checkpoint (expected the workdir of a finished run)")
  if like is None:
    def read(step):
      step_dir = directory / str(step)
      if _frozen_in_step(step_dir):
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        frozen=ocp.args.StandardRestore()))
        return out["state"]["params"], out["frozen"]
      state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
      with _reading_frozen(frozen_path(directory)), ocp.StandardCheckpointer() as checkpointer:
        return state["params"], checkpointer.restore(frozen_path(directory))
    _, out, _ = _newest_intact(mgr, read, reraise=(FrozenParamsError,))
    return out

  want = flatten(like)

  def read_step(step):
    step_dir = directory / str(step)
    in_step = _frozen_in_step(step_dir)
    frozen_dir = step_dir / "frozen" if in_step else frozen_path(directory)
    shared = contextlib.nullcontext() if in_step else _reading_frozen(frozen_dir)
    with shared:
      frozen_paths = _stored_paths(frozen_dir)
    trainable_paths = _stored_paths(step_dir / "state", "params")
    stored = trainable_paths | frozen_paths
    if stored != set(want):
      diff = sorted("/".join(p) + (" (only in the checkpoint)" if p in stored else " (only in this model)")
                    for p in stored ^ set(want))
      raise ParamTreeMismatchError(f"parameters differ at {len(diff)} paths, e.g. {diff[:5]}")
    trainable = _restore_subtree(step_dir / "state", unflatten({p: want[p] for p in trainable_paths}), "params")
    with contextlib.nullcontext() if in_step else _reading_frozen(frozen_dir):
      frozen = _restore_subtree(frozen_dir, unflatten({p: want[p] for p in frozen_paths})) if frozen_paths else {}
    return trainable, frozen

  # a tree that does not fit is the config's problem, and a damaged frozen_params folder the whole
  # run's, not a damaged step: no fallback for either
  _, out, _ = _newest_intact(mgr, read_step, reraise=(ParamTreeMismatchError, FrozenParamsError))
  return out
