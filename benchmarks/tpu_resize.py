"""The depth head's bilinear resizes compiled for one TPU chip: gathers vs the TPU's matmul form.

  python -m benchmarks.tpu_resize [--topology v5p:2x2x1] [--rows 10]

Compiles (libtpu, on this host; nothing runs) the forward and gradient of the DPT head's two
full-resolution resizes at the paper stage-2 shapes (10 rows per chip, 768x1024): `output_conv1`'s
input (192x256x256 -> 384x512) and `output_conv2_0`'s (384x512x128 -> 768x1024), bfloat16. Each is
compiled twice in this process: with the gather-and-lerp form that CPU and GPU programs use, and with
`resize._resize_axis_matmul`, which TPU programs use. Prints the compiler's figures side by side:
while loops in the optimised HLO, `optimal_seconds`, bytes accessed, FLOPs, temporaries.
The cost model counts a while loop's body once, so the gather form's time is a lower bound.
"""

from __future__ import annotations

import argparse
import os
import time

# (input H, W, C, output H, W) of the head's resizes at 768x1024.
SHAPES = [(192, 256, 256, 384, 512), (384, 512, 128, 768, 1024)]


def compile_form(form: str, mesh, shape, rows: int) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  from depthvlm_jax import sharding
  from depthvlm_jax.model import resize
  h, w, c, ho, wo = shape
  x = jax.ShapeDtypeStruct((rows, h, w, c), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))

  def loss(a):  # a new function per compile: no cached trace
    return jnp.sum(resize.resize_bilinear_align_corners(a, (ho, wo)).astype(jnp.float32) ** 2)

  original = resize.compile_target
  resize.compile_target = (lambda: "cpu") if form == "gather" else sharding.compile_target
  try:
    t = time.time()
    compiled = jax.jit(sharding.in_mesh(jax.grad(loss), mesh)).lower(x).compile()
    compile_s = time.time() - t
  finally:
    resize.compile_target = original
  cost = compiled.cost_analysis()
  return {"loops": compiled.as_text().count(" while("), "est_ms": 1e3 * cost["optimal_seconds"],
          "gb": cost["bytes accessed"] / 1e9, "gflop": cost["flops"] / 1e9,
          "temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30, "compile_s": compile_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--rows", type=int, default=10, help="images per chip (paper stage 2 on v5p 4x4x4: 10)")
  args = parser.parse_args()
  import numpy as np
  from jax.sharding import Mesh
  from depthvlm_jax import aot
  mesh = Mesh(np.array(aot.topology_devices(args.topology)[:1]), ("data",))
  print(f"one {args.topology.split(':')[0]} chip, {args.rows} rows, bfloat16, forward + gradient")
  print("| resize | form | while loops | est ms | GB accessed | GFLOP | temp GiB |")
  print("|---|---|---|---|---|---|---|")
  for shape in SHAPES:
    rows = {form: compile_form(form, mesh, shape, args.rows) for form in ("gather", "matmul")}
    h, w, c, ho, wo = shape
    for form, r in rows.items():
      print(f"| {h}x{w}x{c} -> {ho}x{wo} | {form} | {r['loops']} | {r['est_ms']:.2f} | {r['gb']:.1f} | "
            f"{r['gflop']:.0f} | {r['temp_gib']:.2f} |", flush=True)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
