"""Ahead-of-time compilation report: compile the exact train and inference programs for a TPU slice
(or NVIDIA GPUs) without one, and read per-chip memory, cost model, MFU and collectives.

    python -m depthvlm_jax.aot --config=configs/stage1.py:paper_4b --topology=v5p:4x4x4 [--json OUT.json]
    python -m depthvlm_jax.aot --config=configs/stage2.py --topology=v5e:2x2 --config.train.global_batch=16
    python -m depthvlm_jax.aot --sweep [--sweep_out DIR] [--buckets=768x1024] [--memory_only]   # the plan table

Every program (the trainer's train step, the predict CLI's prefill and decode) is compiled once per
image bucket of `data.buckets` (the trainer compiles one step per bucket), named `PROGRAM@HxW` (e.g.
`train@768x1024`); `--buckets=768x1024,...` limits the report to some of them. `--memory_only`
compiles each train step once, for memory and collectives (no cost probes, no time or MFU): a third
of the compile time.

No TPU is needed: libtpu (the `tpu` extra, `pip install -e ".[tpu]"`) carries the real TPU compiler,
and `jax.experimental.topologies` describes the chips of a named slice ("v5p:4x4x4" = 64 chips on 16
hosts). Each program is lowered with abstract inputs that carry their final shardings on a mesh of
those chips and compiled; nothing is allocated. The figures of each program are described in
`depthvlm_jax/aot/report.py`.
"""

# No module here imports JAX at import time. `aot.report` and `aot.sweep` are the functions; their
# modules are imported by full name (`from depthvlm_jax.aot.report import table`).
from depthvlm_jax.aot.chips import CHIPS, Chip, chip_of, topology_devices
from depthvlm_jax.aot.compiling import compile_stats, shard_bytes
from depthvlm_jax.aot.hlo_stats import COLLECTIVES, collective_stats
from depthvlm_jax.aot.programs import (Setup, TrainInputs, inference_programs, make_setup, train_inputs,
                                       train_model_flops, train_program)
from depthvlm_jax.aot.report import PROGRAMS, report, table
from depthvlm_jax.aot.report import sized as report_sized
from depthvlm_jax.aot.sweep import sweep

__all__ = [
    "CHIPS", "COLLECTIVES", "PROGRAMS", "Chip", "Setup", "TrainInputs", "chip_of",
    "collective_stats", "compile_stats", "inference_programs", "make_setup", "report", "report_sized", "shard_bytes",
    "sweep", "table", "topology_devices", "train_inputs", "train_model_flops", "train_program",
]
