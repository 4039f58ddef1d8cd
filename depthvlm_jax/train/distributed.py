"""Multi-process runs: start-up, each process's share of the data, and host-side helpers.

JAX runs one process per host (or per accelerator); every process executes the same program on
global arrays that span all devices. Start-up order matters: `initialize` must run before any
other JAX call touches a device. Each process then loads only the rows of every global batch that
its own devices hold (`DataShard`), and `global_array` stitches those local rows into one global
array. Files that are not per-process (metrics, results, the synthetic data set) are written by
process 0 only (`is_main`); orbax and grain handle their own multi-process checkpoint files.

With one process every helper here is a no-op, so the single-CPU default needs no flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from typing import Iterator, Sequence

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from depthvlm_jax import sharding

MODES = ("auto", "on", "off")
log = logging.getLogger(__name__)


def _positive_int(name: str) -> int:
  try:
    return int(os.environ.get(name, "1"))
  except ValueError:
    return 1


def tpu_chips_here() -> int:
  """Number of TPU chips attached to this machine, read from its PCI devices (no JAX backend started).

  JAX's own hardware probe is used (the one its Cloud TPU start-up runs); 0 where it is unavailable.
  """
  try:
    from jax._src import hardware_utils
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # noqa: BLE001 -- a private module that may move: no chips found
    return 0


def cluster_detected() -> str | None:
  """Name of a multi-process launcher found in the environment variables, or None.

  Only launches with more than one process count: a 1-task SLURM job stays single-process. A
  machine with TPU chips is a Cloud TPU VM: there `jax.distributed.initialize()` runs with JAX's own
  cluster detection, which reads the pod's worker list from the VM metadata (a single-host VM
  starts as one process of one).
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ and _positive_int("SLURM_NTASKS") > 1:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in os.environ and _positive_int("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h]) > 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU"
  if tpu_chips_here() > 0 and not os.environ.get("TPU_SKIP_MDS_QUERY"):
    return "Cloud TPU VM"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto") -> bool:
  """Starts `jax.distributed` when asked or when a cluster launcher is detected; True if started.

  mode: "off" never starts it; "on" always does (arguments left None are auto-detected by JAX
  from SLURM / Open MPI / Cloud TPU / Kubernetes); "auto" starts it when any argument is given or
  `cluster_detected()` names a launcher. Must run before any JAX computation.
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r}: expected one of {MODES}")
  given = [v for v in (coordinator_address, num_processes, process_id) if v is not None]
  if mode == "off":
    if given:
      raise ValueError("distributed mode 'off' contradicts the coordinator/process flags that were given")
    return False
  launcher = cluster_detected()
  if mode == "auto" and not given and launcher is None:
    return False
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id}: expected 0 <= process_id < num_processes={num_processes}")
  # CPU-to-CPU collectives across processes need an implementation; gloo ships with jaxlib.
  if launcher != "Cloud TPU VM" and jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  log.info("jax.distributed started (%s): process %d of %d, %d local / %d global devices",
               launcher or "flags", jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def is_main() -> bool:
  """True in the process that writes shared files and prints (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def process_sum(x: np.ndarray) -> np.ndarray:
  """Element-wise sum of a host array over processes (e.g. per-process skip counters)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(np.asarray(x))).sum(0)


def shard_gather(x: np.ndarray, shard: "DataShard") -> np.ndarray:
  """(shard.count, ...) the host array `x` of every data shard, in shard order: every process passes
  the value of its own shard (`x` of the same shape everywhere); replicas of a shard (processes that
  load the same rows) pass the same value, taken once."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  index = np.asarray(multihost_utils.process_allgather(np.int32(shard.index))).reshape(-1)
  values = np.asarray(multihost_utils.process_allgather(x)).reshape((len(index),) + x.shape)
  return values[[int(np.flatnonzero(index == i)[0]) for i in range(shard.count)]]


MESSAGE_BYTES = 2048  # room for one failure message in `agree_on_failure`


def agree_on_failure(error: BaseException | None, kinds: tuple[type[BaseException], ...]) -> None:
  """Turns a failure found by some processes into the same failure on every process.

  Each process passes the error it found (or None); `error` must be an instance of one of `kinds`.
  The processes exchange a flag (one small all-gather, every call) and, only when some process
  failed, the message of each. Every process then raises the failure of the lowest-numbered failing
  process, as an instance of the same kind, its message naming that process and its host; the error
  has `on_every_process = True` so that only process 0 reports it. With one process the error is
  raised unchanged.
  """
  if error is not None and not isinstance(error, kinds):
    raise TypeError(f"agree_on_failure: {type(error).__name__} is not one of {[k.__name__ for k in kinds]}")
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  kind = 0 if error is None else 1 + next(i for i, k in enumerate(kinds) if isinstance(error, k))
  flags = np.asarray(multihost_utils.process_allgather(np.int32(kind))).reshape(-1)
  if not flags.any():
    return
  text = "" if error is None else f"{error} (process {jax.process_index()}, host {socket.gethostname()})"
  buf = np.zeros(MESSAGE_BYTES, np.uint8)
  raw = text.encode()[:MESSAGE_BYTES]
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  messages = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(flags), MESSAGE_BYTES)
  first = int(np.flatnonzero(flags)[0])
  agreed = kinds[int(flags[first]) - 1](bytes(messages[first]).rstrip(b"\0").decode(errors="replace"))
  agreed.on_every_process = True
  raise agreed from error


@contextlib.contextmanager
def reported_by_main() -> Iterator[None]:
  """Inside a CLI's error reporting: a failure raised on every process (`on_every_process`) ends the
  other processes with exit status 1 and no message, so that it is reported once, by process 0."""
  try:
    yield
  except Exception as e:
    if getattr(e, "on_every_process", False) and not is_main():
      raise SystemExit(1) from None
    raise


@dataclasses.dataclass(frozen=True)
class DataShard:
  """Which rows of every global batch this process loads.

  The global batch of B rows is split into `count` groups of `local_batch` rows; this process
  loads group `index`. Processes whose devices hold the same rows (replicas along a mesh axis that
  does not shard the batch) get the same index and load the same examples.
  """
  index: int
  count: int
  local_batch: int

  def records(self) -> tuple[int, int]:
    """(index, count): the data shard whose records this process parses and sizes at start-up
    (`pipeline.make_dataset(shard=...)`); which examples it loads is `select`'s."""
    return self.index, self.count

  def select(self, ds: grain.MapDataset) -> grain.MapDataset:
    """Every `count`-th example starting at `index`: together the processes read each global batch
    of the single-process stream exactly once (rows permuted, which a batch mean does not see)."""
    return ds if self.count == 1 else ds[self.index::self.count]


def data_shard(mesh: jax.sharding.Mesh, global_batch: int) -> DataShard:
  """The `DataShard` of this process for batches sharded along the logical "batch" axis."""
  shape = (global_batch,)
  index_map = sharding.activation_sharding(mesh, "batch", shape=shape).devices_indices_map(shape)
  rows: dict[int, set[tuple[int, int]]] = {}
  for device, (sl,) in index_map.items():
    rows.setdefault(device.process_index, set()).add(sl.indices(global_batch)[:2])
  groups = sorted({tuple(sorted(r)) for r in rows.values()})
  sizes = {sum(b - a for a, b in g) for g in groups}
  if len(sizes) != 1 or len(groups) * next(iter(sizes)) != global_batch:
    raise ValueError(f"train.global_batch={global_batch} over mesh {dict(mesh.shape)}: processes hold "
                     f"unequal or overlapping batch rows {groups}; choose a batch divisible by the mesh")
  mine = tuple(sorted(rows[jax.process_index()]))
  return DataShard(index=groups.index(mine), count=len(groups), local_batch=next(iter(sizes)))


def global_array(local: np.ndarray, mesh: jax.sharding.Mesh, names: Sequence[str | None], batch_axis: int,
                 shard: DataShard) -> jax.Array:
  """A global array from this process's rows `local` (batch along `batch_axis`, logical `names`).

  local: (..., local_batch, ...) -> global (..., local_batch * shard.count, ...).
  """
  shape = list(local.shape)
  if shape[batch_axis] != shard.local_batch:
    raise ValueError(f"local batch has {shape[batch_axis]} rows on axis {batch_axis}, "
                     f"expected {shard.local_batch}")
  shape[batch_axis] *= shard.count
  target = sharding.activation_sharding(mesh, *names, shape=shape)
  return jax.make_array_from_process_local_data(target, local, tuple(shape))
