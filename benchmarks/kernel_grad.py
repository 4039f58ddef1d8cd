"""3x3 kernel gradients of the DPT head: XLA's autodiff form vs `cpu_kernels.kernel_grad_3x3`, and the
whole stage-1 train step with each.

  python -m benchmarks.kernel_grad [--repeats 7] [--small]

Autodiff lowers dK of a 'same' 3x3 convolution to a correlation with an (h, w) window and one input
feature; `kernel_grad_3x3` computes the same (3, 3, C, O) array as one matmul over flattened row
offsets. Both are jitted in this process and timed alternately (medians). The step comparison
compiles the benchmark model's stage-1 step twice, with `FLAT_KERNEL_GRAD_MIN_POSITIONS` at its value
and disabled, and alternates them too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, training
from depthvlm_jax.model import cpu_kernels

# (h, w, C, O) of the benchmark model's 3x3 convolutions (640x480 image, half-width DPT).
SHAPES = [(120, 160, 128, 128), (60, 80, 256, 128), (60, 80, 128, 128), (30, 40, 512, 128)]


def autodiff_kernel_grad(x, g):
  kernel = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.vjp(lambda k: cpu_kernels.conv_same(x, k), kernel)[1](g)[0]


def run(setup, params, repeats: int) -> dict:
  rows = []
  for h, w, c, o in SHAPES:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, h, w, c)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((1, h, w, o)), jnp.float32)
    fns = {"autodiff": jax.jit(autodiff_kernel_grad), "matmul": jax.jit(cpu_kernels.kernel_grad_3x3)}
    want, got = fns["autodiff"](x, g), fns["matmul"](x, g)  # also compiles both
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    times = common.alternate({k: functools.partial(lambda f: common.block(f(x, g)), f) for k, f in fns.items()},
                             repeats)
    rows.append(dict(shape=(h, w, c, o), err=err, **{k: common.median(v) for k, v in times.items()}))

  batch, _, _ = training.train_batch(setup)
  default = cpu_kernels.FLAT_KERNEL_GRAD_MIN_POSITIONS
  steps = {}
  try:
    for name, threshold in (("autodiff", 1 << 62), ("matmul", default)):
      cpu_kernels.FLAT_KERNEL_GRAD_MIN_POSITIONS = threshold  # read when the step is traced
      step, state, frozen, dev_batch, _, _ = training.jax_step(setup, params, batch, stage=1)
      steps[name] = [step, state, frozen, dev_batch]
  finally:
    cpu_kernels.FLAT_KERNEL_GRAD_MIN_POSITIONS = default

  step_times = common.alternate(common.step_runners(steps), repeats)
  return {"rows": rows, "step": {k: common.median(v) for k, v in step_times.items()}}


def print_results(r) -> None:
  rows = [[f"{h}x{w}, {c}->{o}", f"{2 * h * w * 9 * c * o / 1e9:.2f}", common.fmt_s(x["autodiff"]),
           common.fmt_s(x["matmul"]), f"{x['matmul'] / x['autodiff']:.2f}", f"{x['err']:.1e}"]
          for x in r["rows"] for (h, w, c, o) in [x["shape"]]]
  common.print_table("3x3 kernel gradient, float32 (XLA autodiff vs cpu_kernels.kernel_grad_3x3)",
                     ["map, channels", "GFLOP", "autodiff", "matmul", "matmul/autodiff", "max rel. diff"], rows)
  s = r["step"]
  common.print_table("Stage-1 train step of the benchmark model (640x480, half-width DPT)",
                     ["kernel gradients", "step (median)"],
                     [["autodiff", common.fmt_s(s["autodiff"])],
                      [f"matmul for maps of >= {cpu_kernels.FLAT_KERNEL_GRAD_MIN_POSITIONS} positions",
                       common.fmt_s(s["matmul"])]])


def main():
  common.run_script(run, print_results, default_repeats=7)


if __name__ == "__main__":
  main()
