"""Figures 2 and 3: one optimiser step, JAX vs PyTorch, and the model FLOP utilisation of ours.

  python -m benchmarks.training [--repeats 3]

Stage 1 trains the depth head only; stage 2 the LLM, the LM head and the depth head (vision
frozen), as `configs/stage1.py` / `configs/stage2.py`. JAX: `train.step.make_train_step` (jitted,
state donated) with `train.optim.make_optimizer` (global-norm clip 1.0 + AdamW). PyTorch: the
exported module, the same freezing, the same losses (SILog per image, next-token cross-entropy;
written below after `depthvlm_jax/losses.py`), `clip_grad_norm_` + `torch.optim.AdamW`.
Same weights, same batch (one 640x480 image with a depth map, 16 answer tokens).

FLOPs for the utilisation figure come from XLA's `cost_analysis()` of the compiled train step; peak
is the measured FLOP/s of a large float32 `jnp.dot` on this machine.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from depthvlm_jax.model.depthvlm import DepthVLM
from depthvlm_jax.train import optim
from depthvlm_jax.runs import freeze
from depthvlm_jax.train.step import initial_state, make_train_step

STAGES = {1: [("depth_head/.*", True), (".*", False)],
          2: [("visual/.*", False), ("(language_model|lm_head|depth_head)/.*", True)]}
TORCH_TRAINABLE = {1: ("depth_head.",), 2: ("model.language_model.", "lm_head.", "depth_head.")}
LR, CLIP, WD, DEPTH_WEIGHT, ANSWER = 1e-4, 1.0, 0.01, 1.0, 16


def train_batch(setup, seed: int = 0, image_hw=common.IMAGE_HW):
  """Right-padded batch with depth GT and labels on the answer tokens (numpy)."""
  inputs, patches, grids = common.image_batch(setup, image_hw, padding_side="right", answer=ANSWER, seed=seed)
  rng = np.random.default_rng(seed + 1)
  h, w = image_hw
  depth = rng.uniform(0.5, 8.0, (1, h, w)).astype(np.float32)
  depth[:, :40] = 0  # some invalid pixels
  labels = np.full_like(inputs["input_ids"], -100)
  n = int(inputs["attention_mask"].sum())
  labels[:, n - ANSWER:n] = inputs["input_ids"][:, n - ANSWER:n]
  batch = dict(inputs, depth=depth, has_depth=np.ones((1,), bool), labels=labels)
  return batch, patches, grids


# ----------------------------------------------------------------------------- PyTorch losses
def torch_silog(pred, gt, lam=0.5, eps=1e-8):
  """Mean over images with a valid pixel of sqrt(mean d^2 - lam mean(d)^2 + eps), d = log pred - log gt."""
  import torch
  valid = (gt > 0) & (pred > 0)
  one = torch.ones_like(pred)
  d = torch.where(valid, torch.log(torch.where(valid, pred, one)) - torch.log(torch.where(valid, gt, one)), 0.0)
  n = valid.sum((1, 2)).float()
  den = n.clamp(min=1)
  mean_d = d.sum((1, 2)) / den
  mean_d2 = (d * d).sum((1, 2)) / den
  loss = torch.sqrt((mean_d2 - lam * mean_d ** 2).clamp(min=0) + eps)
  has = n > 0
  return torch.where(has, loss, 0.0).sum() / has.sum().clamp(min=1)


def torch_step_fn(tm, batch, patches, grids, stage: int):
  import torch
  import torch.nn.functional as F
  for name, p in tm.named_parameters():
    p.requires_grad_(name.startswith(TORCH_TRAINABLE[stage]))
  trainable = [p for p in tm.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WD, betas=(0.9, 0.999), eps=1e-8)
  t_in = common.torch_inputs(batch, patches, grids)
  gt = torch.tensor(batch["depth"])
  labels = torch.tensor(batch["labels"], dtype=torch.long)
  tm.train()

  def step():
    opt.zero_grad(set_to_none=True)
    logits, depth = common.torch_depth_forward(tm, t_in, common.token_grid())
    loss = torch_silog(depth, gt)
    if stage == 2:
      ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
      loss = ce + DEPTH_WEIGHT * loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, CLIP)
    opt.step()
    return float(loss.detach())

  return step


def jax_step(setup, params, batch, stage: int):
  """(compiled step, state, frozen, device batch, compiled-program FLOPs, compile seconds)."""
  model = DepthVLM(setup.config, head=setup.head)
  mask = freeze.trainable_mask(params, STAGES[stage])
  trainable, frozen = freeze.split_params(params, mask)
  trainable = jax.tree.map(jnp.copy, trainable)  # the state is donated: keep `params` alive
  optimizer = optim.make_optimizer(optax.constant_schedule(LR), CLIP, WD)
  state = initial_state(trainable, jax.jit(optimizer.init)(trainable))
  fn = make_train_step(model, optimizer, common.token_grid(), micro_batches=1, depth_weight=DEPTH_WEIGHT,
                       with_lm=stage == 2)
  dev_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, frozen, dev_batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, state, frozen, dev_batch, float(cost.get("flops", float("nan"))), compile_s


def peak_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """Measured FLOP/s of an (n x n) @ (n x n) float32 jnp.dot (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  common.block(dot(a, b))
  best = min(common.timed(lambda: common.block(dot(a, b))) for _ in range(repeats))
  return 2 * n ** 3 / best


def run(setup, params, repeats: int = 3) -> dict:
  batch, patches, grids = train_batch(setup)
  results = {"stages": [], "peak": peak_matmul_flops()}
  common.log(f"peak matmul {results['peak'] / 1e9:.1f} GFLOP/s")
  for stage in (1, 2):
    step, state, frozen, dev_batch, flops, compile_s = jax_step(setup, params, batch, stage)
    common.log(f"stage {stage}: JAX step compiled in {compile_s:.1f} s")
    box = {"state": state}

    def jax_fn():
      box["state"], m = step(box["state"], frozen, dev_batch)
      common.block(m["loss"])

    tm = common.torch_model(setup, params)
    torch_fn = torch_step_fn(tm, batch, patches, grids, stage)
    # One untimed step each: torch creates AdamW's moments on its first step, and both first
    # executions allocate and touch fresh memory; the figure is the steady-state step.
    times = common.alternate({"jax": jax_fn, "torch": torch_fn}, repeats, warmup=1)
    j, t = common.median(times["jax"]), common.median(times["torch"])
    results["stages"].append(dict(stage=stage, jax=j, torch=t, ratio=j / t,
                                  paired=common.paired_ratio(times["jax"], times["torch"]), compile=compile_s,
                                  flops=flops, jax_min=min(times["jax"])))
    del tm, box
  return results


def print_results(r) -> None:
  rows = [[s["stage"], common.fmt_s(s["jax"]), common.fmt_s(s["torch"]), f"{s['ratio']:.2f}", f"{s['paired']:.2f}",
           f"{s['compile']:.1f} s"] for s in r["stages"]]
  common.print_table("2. Training: one optimiser step (batch 1, 640x480 + 16 answer tokens), float32",
                     ["stage", "JAX (jit)", "PyTorch (eager)", "JAX/torch (medians)", "JAX/torch (paired)",
                      "JAX compile"], rows)
  rows = []
  for s in r["stages"]:
    achieved = s["flops"] / s["jax"]
    rows.append([s["stage"], f"{s['flops'] / 1e9:.1f} GFLOP", f"{achieved / 1e9:.1f} GFLOP/s",
                 f"{r['peak'] / 1e9:.1f} GFLOP/s", f"{100 * achieved / r['peak']:.1f} %",
                 f"{100 * s['flops'] / s['jax_min'] / r['peak']:.1f} %"])
  common.print_table("3. Model FLOP utilisation of the JAX train step (FLOPs: XLA cost_analysis of the "
                     "compiled step; peak: measured 2048^3 float32 jnp.dot)",
                     ["stage", "FLOPs / step", "achieved (median)", "peak matmul", "MFU (median)", "MFU (best)"],
                     rows)


def main():
  common.run_script(run, print_results, default_repeats=3, repeats_flag="--repeats")


if __name__ == "__main__":
  main()
