"""The compile report's command line: its flags and `main` (run by `python -m depthvlm_jax.aot`)."""

from __future__ import annotations

import json
import os
import pathlib
import sys

from depthvlm_jax.aot.chips import chip_of
from depthvlm_jax.aot.report import PROGRAMS, _json_safe, report, table
from depthvlm_jax.aot.sweep import SWEEP_PRESETS, SWEEP_TOPOLOGIES, sweep


def main(argv):
  from absl import flags
  del argv
  f = flags.FLAGS
  if f.sweep:
    rows = sweep(pathlib.Path(f.sweep_out), presets=tuple(f.sweep_presets), topologies=tuple(f.sweep_topologies),
                 programs=tuple(f.programs), memory_only=f.memory_only, buckets=tuple(f.buckets))
    print(table(rows))
    return 0
  if not f.topology:
    print("error: --topology is required (e.g. --topology=v5p:4x4x4), or --sweep", file=sys.stderr)
    return 2
  try:
    chip_of(f.topology)
    result = report(f["config"].value, f.topology, tuple(f.programs), buckets=tuple(f.buckets),
                    memory_only=f.memory_only)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(table([result]))
  if f.json:
    pathlib.Path(f.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(f.json + ".tmp")
    tmp.write_text(json.dumps(_json_safe(result), indent=2))
    os.replace(tmp, f.json)
  return 0


def define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/stage1.py", "Training configuration file.", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:4x4x4, v5e:16x16, v6e:8x8, v5e:2x2.")
  flags.DEFINE_string("json", None, "Write the report as JSON here.")
  flags.DEFINE_list("programs", list(PROGRAMS), "Programs to compile (with --sweep: "
                    "give e.g. --programs=train to compile the train steps only).")
  flags.DEFINE_list("buckets", [], "Compile only these buckets of data.buckets, as HxW (default: all).")
  flags.DEFINE_bool("memory_only", False, "Train programs: compile the step once for memory and collectives, "
                    "without the loop-cost probes (one compile instead of three; no FLOPs, time or MFU).")
  flags.DEFINE_bool("sweep", False, "Compile the README plan table (paper presets x stages x slices).")
  flags.DEFINE_string("sweep_out", "runs/aot_sweep", "Folder for the sweep's per-row JSON files.")
  flags.DEFINE_list("sweep_presets", list(SWEEP_PRESETS), "Presets of the sweep.")
  flags.DEFINE_list("sweep_topologies", list(SWEEP_TOPOLOGIES), "Slices of the sweep.")

