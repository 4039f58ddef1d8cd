"""Figure 4: the paper's efficiency claim: dense depth from one forward vs DepthLM-style queries.

  python -m benchmarks.per_point [--repeats 3]

DepthVLM: one jitted forward (logits + 640x480 depth) gives every pixel. DepthLM-style: each
queried pixel is its own generation: prefill of (image + a prompt naming the pixel) and greedy
decoding of the number's tokens (5 tokens, e.g. "2.35" + end), with `depthvlm_jax.generate` on the
same backbone and weights. We also report the per-pixel cost if the image prefix were prefilled
once and only the 5 decode steps were paid per pixel (a lower bound for any per-point method). The
decode step is timed as (generation of 1 + 64 tokens - generation of 1 token) / 64, paired per
repeat, so that it stands well above the noise of the prefill.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.inference import jax_forward_fn
from depthvlm_jax.generate import SamplingConfig, generate_tokens
from depthvlm_jax.model.depthvlm import DepthVLM

ANSWER_TOKENS = 5
DECODE_STEPS_TIMED = 64


def run(setup, params, repeats: int = 3) -> dict:
  inputs, _, _ = common.image_batch(setup, padding_side="left")
  j_in = {k: jnp.asarray(v) for k, v in inputs.items()}
  model = DepthVLM(setup.config, head=setup.head)
  fwd = jax_forward_fn(setup)

  def gen(n):
    s = SamplingConfig(max_new_tokens=n)
    return lambda: common.block(generate_tokens(model, params, j_in["input_ids"], j_in["attention_mask"],
                                                j_in["position_ids"], jax.random.key(0), j_in["pixel_values"],
                                                j_in["image_grid_hw"], sampling=s)[0])

  query, prefill_only, long = gen(ANSWER_TOKENS), gen(1), gen(1 + DECODE_STEPS_TIMED)
  dense = lambda: common.block(fwd(params, j_in))
  times = common.alternate({"dense": dense, "query": query, "prefill": prefill_only, "long": long}, repeats)
  t_dense, t_query, t_prefill = (common.median(times[k]) for k in ("dense", "query", "prefill"))
  decode_step = common.median([(a - b) / DECODE_STEPS_TIMED for a, b in zip(times["long"], times["prefill"])])
  pixels = common.IMAGE_HW[0] * common.IMAGE_HW[1]
  return dict(dense=t_dense, query=t_query, prefill=t_prefill, decode_step=decode_step, pixels=pixels)


def print_results(r) -> None:
  per_dense = r["dense"] / r["pixels"]
  per_query = r["query"]
  per_decode = ANSWER_TOKENS * r["decode_step"]
  rows = [["DepthVLM: one forward, all 640x480 pixels", common.fmt_s(r["dense"]), f"{per_dense * 1e6:.3f} us", "1"],
          [f"DepthLM-style: prefill + {ANSWER_TOKENS} greedy tokens per pixel", common.fmt_s(r["query"]),
           f"{per_query * 1e6:.0f} us", f"{per_query / per_dense:.2e}"],
          [f"lower bound: {ANSWER_TOKENS} decode steps per pixel (shared prefill)", common.fmt_s(per_decode),
           f"{per_decode * 1e6:.0f} us", f"{per_decode / per_dense:.2e}"]]
  common.print_table("4. Time per depth pixel: dense head vs per-point text queries (same backbone, float32)",
                     ["method", "time per call", "time per pixel", "x DepthVLM"], rows)


def main():
  common.run_script(run, print_results, default_repeats=3, repeats_flag="--repeats")


if __name__ == "__main__":
  main()
