"""The README's plan table: paper presets x stages x slices, one report per row in its own process."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

SWEEP_PRESETS = ("paper_4b", "paper_8b")
SWEEP_TOPOLOGIES = ("v5p:4x4x4", "v5e:16x16", "v6e:8x8")

# Each row is the preset alone: the report sizes it for the slice as the trainer sizes a run
# (`depthvlm_jax.train.sizing`: mesh, rows per chip, micro-batches).


def sweep(out_dir: pathlib.Path, presets=SWEEP_PRESETS, topologies=SWEEP_TOPOLOGIES, stages=(1, 2),
          programs=("train",), timeout_s: int = 7200, memory_only: bool = False,
          buckets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
  """One subprocess per (preset, stage, slice) so each compile starts clean; JSON files in out_dir.

  Rows already in out_dir are reused, so an interrupted sweep continues where it stopped.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for preset in presets:
    for stage in stages:
      for topo in topologies:
        path = out_dir / f"{preset}_stage{stage}_{topo.replace(':', '_')}.json"
        if not path.exists():
          cmd = [sys.executable, "-m", "depthvlm_jax.aot", f"--config=configs/stage{stage}.py:{preset}",
                 f"--topology={topo}", f"--json={path}", f"--programs={','.join(programs)}",
                 *(["--memory_only"] if memory_only else []), *([f"--buckets={','.join(buckets)}"] if buckets else [])]
          print("+", " ".join(cmd), flush=True)
          try:
            subprocess.run(cmd, check=False, timeout=timeout_s)
          except subprocess.TimeoutExpired:
            print(f"{path.name}: compile did not finish in {timeout_s} s", flush=True)
        if path.exists():
          rows.append(json.loads(path.read_text()))
  return rows
