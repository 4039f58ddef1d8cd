"""Figure 1: image -> logits + full-resolution depth, jitted JAX vs the PyTorch module (eager).

  python -m benchmarks.inference [--repeats 5]

Same weights (moved with `export.write_hf_dir` + `from_pretrained`), same 640x480 image, same
thread count; JAX and torch are timed alternately and the ratio of medians is reported.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from depthvlm_jax.model.depthvlm import DepthVLM


def jax_forward_fn(setup, dtype=jnp.float32):
  model = DepthVLM(setup.config, head=setup.head, dtype=dtype)
  grid = common.token_grid()

  @jax.jit
  def forward(params, inputs):
    out = model.apply({"params": params}, **inputs, depth_grid=grid)
    return out.logits, out.depth

  return forward


def run(setup, params, repeats: int = 5) -> list[dict]:
  import torch
  inputs, patches, grids = common.image_batch(setup)
  grid = common.token_grid()
  results = []
  for dtype in ("float32", "bfloat16"):
    jdt = jnp.float32 if dtype == "float32" else jnp.bfloat16
    p = params if dtype == "float32" else jax.tree.map(lambda x: x.astype(jdt), params)
    j_in = {k: jnp.asarray(v) for k, v in inputs.items()}
    if dtype == "bfloat16":
      j_in["pixel_values"] = j_in["pixel_values"].astype(jdt)
    fwd = jax_forward_fn(setup, jdt)
    tm = common.torch_model(setup, params, dtype)
    t_in = common.torch_inputs(inputs, patches, grids, dtype)
    compile_s = common.timed(lambda: common.block(fwd(p, j_in)))
    jl, jd = fwd(p, j_in)
    with torch.inference_mode():
      tl, td = common.torch_depth_forward(tm, t_in, grid)
    real = inputs["attention_mask"].astype(bool)
    lj, lt = np.asarray(jl.astype(jnp.float32))[real], tl.float().numpy()[real]
    logit_err = float(np.abs(lj - lt).max() / np.abs(lt).max())
    depth_err = float((np.abs(np.asarray(jd.astype(jnp.float32)) - td.float().numpy()) / td.float().numpy()).max())

    def torch_fn():
      with torch.inference_mode():
        common.torch_depth_forward(tm, t_in, grid)

    times = common.alternate({"jax": lambda: common.block(fwd(p, j_in)), "torch": torch_fn}, repeats,
                             warmup=0)  # both already ran once above
    results.append(dict(dtype=dtype, jax=common.median(times["jax"]), torch=common.median(times["torch"]),
                        ratio=common.median(times["jax"]) / common.median(times["torch"]),
                        paired=common.paired_ratio(times["jax"], times["torch"]), compile=compile_s,
                        logit_err=logit_err, depth_err=depth_err))
    del tm
  return results


def print_results(results) -> None:
  rows = [[r["dtype"], common.fmt_s(r["jax"]), common.fmt_s(r["torch"]), f"{r['ratio']:.2f}", f"{r['paired']:.2f}",
           f"{r['compile']:.1f} s", f"{r['logit_err']:.1e} / {r['depth_err']:.1e}"] for r in results]
  common.print_table("1. Inference: 640x480 image (300 tokens) -> logits + 640x480 depth, batch 1",
                     ["dtype", "JAX (jit)", "PyTorch (eager)", "JAX/torch (medians)", "JAX/torch (paired)",
                      "JAX compile", "max rel. diff logits / depth"], rows)


def main():
  common.run_script(run, print_results, default_repeats=5, repeats_flag="--repeats")


if __name__ == "__main__":
  main()
