"""Shared pieces of the benchmark suite: the benchmark model, its inputs, the PyTorch twin, timing.

The benchmark model is a small Qwen3-VL (4 vision blocks of width 256, 4 decoder layers of width
512, vocabulary 8192) with a DPT head at half the official widths (features 128, projections
128/256/512/512, head 32; the official ones are 256, 256/512/1024/1024, 32), fed one 640x480 image (a 20x15 grid = 300 image tokens). Special token
ids are moved inside the small vocabulary so the PyTorch embedding accepts them.
"""

from __future__ import annotations

import argparse

import dataclasses
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

from depthvlm_jax.model.config import Qwen3VLConfig, TextConfig, VisionConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, depthvlm_dummy_inputs
from depthvlm_jax.model.inputs import make_model_inputs

IMAGE_HW = (480, 640)  # (H, W) pixels: 15 x 20 tokens of 32 px
VOCAB = 8192
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 8000, 8001, 8002, 8003


@dataclasses.dataclass(frozen=True)
class Setup:
  config: Qwen3VLConfig
  head: DepthHeadConfig


def bench_setup(small: bool = False) -> Setup:
  """The benchmark model (or, with `small`, a much narrower one for the smoke test)."""
  if small:
    vision = VisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          num_position_embeddings=256, deepstack_visual_indexes=(0, 1, 2))
    text = TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                      mrope_section=(2, 3, 3), max_position_embeddings=4096)
    head = DepthHeadConfig.tiny()
  else:
    vision = VisionConfig(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                          deepstack_visual_indexes=(1, 2, 3))
    text = TextConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, mrope_section=(12, 10, 10),
                      max_position_embeddings=4096)
    # Half the official DPT widths (256 / 256,512,1024,1024 / 32): the official head alone costs
    # ~0.2 TFLOP per 640x480 forward, too much for a 15-minute suite on 2 shared CPU cores.
    head = DepthHeadConfig(features=128, out_channels=(128, 256, 512, 512), head_features=32)
  config = Qwen3VLConfig(vision=vision, text=text, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                         vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                         tie_word_embeddings=False)
  return Setup(config, head)


def init_params(setup: Setup, seed: int = 0) -> dict[str, Any]:
  model = DepthVLM(setup.config, head=setup.head)
  init = jax.jit(lambda: __import__("flax").linen.unbox(
      model.init(jax.random.key(seed), **depthvlm_dummy_inputs(setup.config))["params"]))
  return init()


def prompt_tokens(rng: np.random.Generator, n_image_tokens: int, n_before: int = 12, n_after: int = 10,
                  answer: int = 0) -> list[int]:
  """Random text ids around one `<|vision_start|><|image_pad|>*N<|vision_end|>` run."""
  text = lambda n: rng.integers(10, 7000, n).tolist()
  return text(n_before) + [VISION_START] + [IMAGE_TOKEN] * n_image_tokens + [VISION_END] + text(n_after + answer)


def image_batch(setup: Setup, image_hw=IMAGE_HW, batch: int = 1, padding_side: str = "left", answer: int = 0,
                seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[int, int]]]:
  """Model inputs for `batch` prompts with one random image each.

  Returns (inputs dict for `DepthVLM.__call__` (numpy), patches (N*P, 1536) for torch, patch grids).
  """
  rng = np.random.default_rng(seed)
  px = setup.config.vision.patch_size
  grid = (image_hw[0] // px, image_hw[1] // px)
  n_tokens = grid[0] * grid[1] // setup.config.vision.spatial_merge_size**2
  toks = [prompt_tokens(rng, n_tokens, answer=answer) for _ in range(batch)]
  patches = [rng.standard_normal((grid[0] * grid[1], setup.config.vision.patch_dim)).astype(np.float32)
             for _ in range(batch)]
  grids = [grid] * batch
  inputs = make_model_inputs(toks, setup.config, patches, grids, padding_side=padding_side)
  inputs.pop("rope_deltas")
  return inputs, np.concatenate(patches), grids


def token_grid(image_hw=IMAGE_HW) -> tuple[int, int]:
  return image_hw[0] // 32, image_hw[1] // 32


# ----------------------------------------------------------------------------- PyTorch twin
def torch_model(setup: Setup, params, dtype: str = "float32"):
  """`DepthVLMForConditionalGeneration` loaded from `export.write_hf_dir` output (the interop path)."""
  import torch
  from depthvlm_jax import export
  from depthvlm_jax.torch_export import DepthVLMForConditionalGeneration
  with tempfile.TemporaryDirectory() as tmp:
    out = export.write_hf_dir(params, setup.config, setup.head, os.path.join(tmp, "hf"), processing_files=False)
    model = DepthVLMForConditionalGeneration.from_pretrained(out).eval()
  if dtype == "bfloat16":
    model = model.to(torch.bfloat16)
  return model


def torch_inputs(inputs: dict[str, np.ndarray], patches: np.ndarray, grids, dtype: str = "float32"):
  import torch
  ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
  pv = torch.tensor(patches)
  if dtype == "bfloat16":
    pv = pv.to(torch.bfloat16)
  return dict(input_ids=ids, attention_mask=torch.tensor(inputs["attention_mask"], dtype=torch.long),
              pixel_values=pv, image_grid_thw=torch.tensor([[1, h, w] for h, w in grids]))


def torch_depth_forward(model, t_inputs, grid_hw: tuple[int, int], output_size=None):
  """One backbone pass + the DPT head on every image (all images share `grid_hw` tokens).

  Like `DepthVLMForConditionalGeneration.depth_forward`, but runs the vision tower once (its
  DeepStack outputs are caught with a forward hook) and keeps autograd usable for training.
  Returns (logits (B, L, V), depth (N, H, W)).
  """
  import torch
  caught = {}
  hook = model.model.visual.register_forward_hook(lambda m, a, out: caught.setdefault("v", out))
  try:
    ids = t_inputs["input_ids"]
    mm = (ids == model.config.image_token_id).int()
    out = model.model(input_ids=ids, attention_mask=t_inputs["attention_mask"], mm_token_type_ids=mm,
                      pixel_values=t_inputs["pixel_values"], image_grid_thw=t_inputs["image_grid_thw"])
  finally:
    hook.remove()
  last = out.last_hidden_state
  logits = model.lm_head(last)
  h, w = grid_hw
  n = t_inputs["image_grid_thw"].shape[0]
  img_last = last[ids == model.config.image_token_id].reshape(n, h * w, -1)
  # get_image_features splits the caught output per image in place: join the pieces again
  ds = [torch.cat(list(f)) if isinstance(f, (tuple, list)) else f for f in caught["v"].deepstack_features]
  feats = [f.reshape(n, h * w, -1) for f in ds] + [img_last]
  depth = model.depth_head(feats, h, w, output_size)
  return logits, depth


# ----------------------------------------------------------------------------- timing
def block(x):
  return jax.block_until_ready(x)


def timed(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
  """Runs the callables in turn (a, b, a, b, ...) so all see the same machine load."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {k: [] for k in fns}
  for i in range(repeats):
    for k, fn in fns.items():
      times[k].append(timed(fn))
    log("repeat %d: %s" % (i, ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())))
  return times


def step_runners(steps: dict[str, list]) -> dict[str, Callable[[], None]]:
  """One callable per `[compiled train step, state, frozen, batch]` entry: runs a step, carries the
  (donated) state, blocks on the loss."""
  def runner(entry):
    def fn():
      entry[1], metrics = entry[0](entry[1], entry[2], entry[3])
      block(metrics["loss"])
    return fn

  return {name: runner(entry) for name, entry in steps.items()}


def median(xs) -> float:
  return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
  """Median of per-repeat ratios a_i / b_i (robust to load changes between repeats)."""
  return statistics.median(x / y for x, y in zip(a, b))


def fmt_s(x: float) -> str:
  return f"{x * 1e3:.0f} ms" if x < 10 else f"{x:.1f} s"


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
  cols = [header] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  print(f"\n### {title}\n")
  print(line(header))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in cols[1:]:
    print(line(r))
  print(flush=True)


def set_threads() -> int:
  """Gives PyTorch as many intra-op threads as XLA's CPU client uses (one per core)."""
  import torch
  n = os.cpu_count() or 1
  torch.set_num_threads(n)
  return n


_T0 = time.time()


def log(msg: str) -> None:
  """Progress line on stderr with the seconds since the suite started."""
  import sys
  print(f"[{time.time() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def run_script(run: Callable, print_results: Callable, default_repeats: int = 3, repeats_flag: str = "--repeats") -> None:
  """The command line shared by the figure scripts: `[--repeats N] [--small]` -> run -> print."""
  ap = argparse.ArgumentParser()
  ap.add_argument(repeats_flag, dest="repeats", type=int, default=default_repeats)
  ap.add_argument("--small", action="store_true", help="the tiny model instead of the realistic config")
  args = ap.parse_args()
  set_threads()
  setup = bench_setup(args.small)
  print_results(run(setup, init_params(setup), args.repeats))
