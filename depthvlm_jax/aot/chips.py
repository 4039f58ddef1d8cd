"""The chips a report compiles for: public per-chip figures, and the compile-only devices of a named
slice (libtpu for TPUs, the CUDA PJRT plugin for GPUs); no accelerator is needed."""

from __future__ import annotations

import dataclasses
import os
import pathlib


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
GPU_TARGETS = {"h100": pathlib.Path(__file__).parents[1] / "gpu_targets" / "h100_sxm.txtpb"}


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
