"""Figure 5a: compile time and compilation count over an epoch of mixed image sizes.

  python -m benchmarks.compile_epoch

An epoch visits three image-size buckets in shuffled order (batch 1, stage-1 train step of the
benchmark model). Each bucket has one static shape (image size, sequence length), so the expected
count is one XLA compilation per bucket and none afterwards. Compilations and their time are
counted with a `jax.monitoring` listener on XLA backend compiles.
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks.training import CLIP, LR, STAGES, WD, train_batch
from depthvlm_jax.model.depthvlm import DepthVLM
from depthvlm_jax.train import optim
from depthvlm_jax.runs import freeze
from depthvlm_jax.train.step import initial_state, make_train_step

BUCKETS = ((192, 256), (256, 320), (288, 384))  # (H, W) pixels: 48, 80, 108 image tokens
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def run(setup, params, steps_per_bucket: int = 3, seed: int = 0) -> dict:
  model = DepthVLM(setup.config, head=setup.head)
  mask = freeze.trainable_mask(params, STAGES[1])
  trainable, frozen = freeze.split_params(params, mask)
  optimizer = optim.make_optimizer(optax.constant_schedule(LR), CLIP, WD)
  state = initial_state(jax.tree.map(jnp.copy, trainable), jax.jit(optimizer.init)(trainable))
  steps, batches = {}, {}
  for hw in BUCKETS:  # one jitted step per bucket: the depth grid is a static argument
    steps[hw] = jax.jit(make_train_step(model, optimizer, common.token_grid(hw), 1, 1.0, with_lm=False),
                        donate_argnums=(0,))
    b, _, _ = train_batch(setup, image_hw=hw)
    batches[hw] = {k: jnp.asarray(v) for k, v in b.items()}
  order = [hw for hw in BUCKETS for _ in range(steps_per_bucket)]
  np.random.default_rng(seed).shuffle(order)

  compiles = []
  listener = lambda event, duration, **kw: compiles.append(duration) if event == BACKEND_COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  seen, step_times = set(), collections.defaultdict(list)
  t_epoch = time.perf_counter()
  try:
    for hw in order:
      t0 = time.perf_counter()
      state, m = steps[hw](state, frozen, batches[hw])
      common.block(m["loss"])
      if hw in seen:
        step_times[hw].append(time.perf_counter() - t0)
      seen.add(hw)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  epoch = time.perf_counter() - t_epoch
  return dict(steps=len(order), compiles=len(compiles), compile_s=sum(compiles), epoch=epoch,
              step_times={hw: common.median(t) for hw, t in step_times.items() if t})


def print_results(r) -> None:
  rows = [[f"{h}x{w} ({h // 32 * (w // 32)} tokens)", common.fmt_s(r["step_times"].get((h, w), float("nan")))]
          for h, w in BUCKETS]
  common.print_table(f"5a. Compilation over an epoch of {r['steps']} stage-1 steps over {len(BUCKETS)} "
                     f"image-size buckets: {r['compiles']} XLA compilations, {r['compile_s']:.1f} s compiling, "
                     f"{r['epoch']:.1f} s epoch", ["bucket (H x W)", "step after compile (median)"], rows)


def main():
  common.run_script(run, print_results, default_repeats=3, repeats_flag="--steps_per_bucket")


if __name__ == "__main__":
  main()
