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

import dataclasses
import logging
import os
from typing import Sequence

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


def cluster_detected() -> str | None:
  """Name of a multi-process launcher found in the environment variables, or None.

  Only launches with more than one process count: a 1-task SLURM job stays single-process. Cloud
  TPU pods whose worker list lives in the VM metadata (not the environment) need `mode="on"`.
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
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
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
