"""The README's plan table: paper presets x stages x slices, one report per row in its own process."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

from depthvlm_jax.aot.chips import topology_devices

SWEEP_PRESETS = ("paper_4b", "paper_8b")
SWEEP_TOPOLOGIES = ("v5p:4x4x4", "v5e:16x16", "v6e:8x8")

# Largest per-chip micro-batch the sweep gives each stage on each chip (samples), from the chip's HBM.
# v5p: 5 / 10 rows measured at 11.2 / 22.8 GiB peak (paper_4b, 768x1024); v6e (32 GiB) takes 5 in both
# stages from those, and the H100 (80 GB) the v5p's; v4 and v5e are estimates.
SWEEP_MICRO_BATCH = {1: {"v4": 2, "v5e": 1, "v5p": 5, "v6e": 5, "h100": 5},
                     2: {"v4": 1, "v5e": 1, "v5p": 10, "v6e": 5, "h100": 10}}


def slice_overrides(stage: int, global_batch: int, topology: str, chips: int) -> list[str]:
  """Mesh and micro-batching for one sweep row, as --config overrides.

  FSDP over every chip, or FSDP x 2-way tensor parallelism when the global batch does not split
  over every chip (640 over 256 v5e chips); then the fewest micro-batches whose per-chip rows stay
  within `SWEEP_MICRO_BATCH`.
  """
  tensor = 1
  while global_batch % (chips // tensor) and tensor < chips:
    tensor *= 2
  shards = chips // tensor
  per_chip = global_batch // shards
  limit = SWEEP_MICRO_BATCH[stage][topology.split(":")[0]]
  k = next(k for k in range(1, per_chip + 1) if per_chip % k == 0 and per_chip // k <= limit)
  return [f"--config.mesh.fsdp={shards}", f"--config.mesh.tensor={tensor}", "--config.mesh.data=1",
          f"--config.train.micro_batches={k}"]


def sweep(out_dir: pathlib.Path, presets=SWEEP_PRESETS, topologies=SWEEP_TOPOLOGIES, stages=(1, 2),
          programs=("train",), timeout_s: int = 7200, memory_only: bool = False,
          buckets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
  """One subprocess per (preset, stage, slice) so each compile starts clean; JSON files in out_dir.

  Rows already in out_dir are reused, so an interrupted sweep continues where it stopped.
  """
  from depthvlm_jax.presets import get_config  # by name: the `presets` argument would hide the module
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for preset in presets:
    for stage in stages:
      batch = get_config(stage, preset).train.global_batch
      for topo in topologies:
        path = out_dir / f"{preset}_stage{stage}_{topo.replace(':', '_')}.json"
        if not path.exists():
          chips = len(topology_devices(topo))
          cmd = [sys.executable, "-m", "depthvlm_jax.aot", f"--config=configs/stage{stage}.py:{preset}",
                 f"--topology={topo}", f"--json={path}", f"--programs={','.join(programs)}",
                 *(["--memory_only"] if memory_only else []), *([f"--buckets={','.join(buckets)}"] if buckets else []),
                 *slice_overrides(stage, batch, topo, chips)]
          print("+", " ".join(cmd), flush=True)
          try:
            subprocess.run(cmd, check=False, timeout=timeout_s)
          except subprocess.TimeoutExpired:
            print(f"{path.name}: compile did not finish in {timeout_s} s", flush=True)
        if path.exists():
          rows.append(json.loads(path.read_text()))
  return rows
