"""Attention: the textbook form (softmax over the (q, kv) weights, then the value product) vs
`layers.attention`, per call and in the whole stage-2 train step.

  python -m benchmarks.attention [--repeats 7] [--small]

`layers.attention` folds the query heads of each KV group onto the query axis (both products plain
row-major batched matmuls) and normalises after the value product. The textbook form below is what
it replaced. Both are jitted in this process and timed alternately (medians); the step comparison
compiles the benchmark model's stage-2 step once with each form (the model modules look the
function up when the step is traced) and alternates the two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, training
from depthvlm_jax.model import layers, text, vision


def textbook_attention(q, k, v, mask):
  """Grouped-query attention as usually written: (b, kv_heads, group, q, kv) weights, softmax, product."""
  b, lq, h, d = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, lq, kvh, h // kvh, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, mask.shape[1], lq, k.shape[1]))
    m = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(b, kvh, h // kvh, lq, -1)
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, lq, h, d)


def cases(setup):
  """(name, q/k/v shapes, mask, differentiate?) for one vision block and one LLM layer of the model."""
  vc, tc = setup.config.vision, setup.config.text
  n_vision = (common.IMAGE_HW[0] // vc.patch_size) * (common.IMAGE_HW[1] // vc.patch_size)
  n_text = n_vision // vc.spatial_merge_size**2 + 40
  vision_mask = np.ones((1, 1, 1, n_vision), bool)
  causal = np.tril(np.ones((n_text, n_text), bool))[None, None]
  return [(f"vision block forward ({n_vision} tokens, {vc.num_heads} heads)",
           (1, n_vision, vc.num_heads, vc.hidden_size // vc.num_heads), vc.num_heads, vision_mask, False),
          (f"LLM layer forward + gradient ({n_text} tokens, {tc.num_attention_heads} heads / "
           f"{tc.num_key_value_heads} KV)", (1, n_text, tc.num_attention_heads, tc.head_dim),
           tc.num_key_value_heads, causal, True)]


def run(setup, params, repeats: int) -> dict:
  forms = {"textbook": textbook_attention, "layers.attention": layers.attention}
  rows = []
  for name, (b, n, h, d), kvh, mask, grad in cases(setup):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, n, kvh, d)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(mask)
    if grad:
      fns = {f: jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, mask) ** 2), argnums=(0, 1, 2)))
             for f, fn in forms.items()}
    else:
      fns = {f: jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, mask)) for f, fn in forms.items()}
    want, got = (jax.tree.leaves(fns[f](q, k, v)) for f in forms)  # also compiles both
    err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(want, got))
    times = common.alternate({f: functools.partial(lambda fn: common.block(fn(q, k, v)), fn)
                              for f, fn in fns.items()}, repeats)
    rows.append(dict(name=name, err=err, **{f: common.median(t) for f, t in times.items()}))

  batch, _, _ = training.train_batch(setup)
  steps = {}
  try:
    for form, fn in forms.items():
      # looked up when the step is traced; the model passes an `AttentionMask` and its kernel setting
      as_model_calls = lambda q, k, v, mask, impl="auto", fn=fn: fn(q, k, v, mask.dense(q.shape[1]))
      text.attention = vision.attention = as_model_calls
      step, state, frozen, dev_batch, _, _ = training.jax_step(setup, params, batch, stage=2)
      steps[form] = [step, state, frozen, dev_batch]
  finally:
    text.attention = vision.attention = layers.attention

  step_times = common.alternate(common.step_runners(steps), repeats)
  return {"rows": rows, "step": {f: common.median(t) for f, t in step_times.items()},
          "paired": common.paired_ratio(step_times["layers.attention"], step_times["textbook"])}


def print_results(r) -> None:
  rows = [[x["name"], common.fmt_s(x["textbook"]), common.fmt_s(x["layers.attention"]),
           f"{x['layers.attention'] / x['textbook']:.2f}", f"{x['err']:.1e}"] for x in r["rows"]]
  common.print_table("Attention, float32 (textbook form vs layers.attention)",
                     ["call", "textbook", "layers.attention", "ratio", "max rel. diff"], rows)
  s = r["step"]
  common.print_table("Stage-2 train step of the benchmark model with each attention form",
                     ["attention", "step (median)"],
                     [["textbook", common.fmt_s(s["textbook"])],
                      ["layers.attention", common.fmt_s(s["layers.attention"])],
                      ["ratio (paired)", f"{r['paired']:.2f}"]])


def main():
  common.run_script(run, print_results, default_repeats=7)


if __name__ == "__main__":
  main()
