"""The whole benchmark suite in one command; prints every figure as a Markdown table.

  python -m benchmarks.run_all [--repeats 5] [--small]

  1. inference: JAX jit vs PyTorch eager, float32 and bfloat16     (benchmarks/inference.py)
  2. training: one optimiser step, stages 1 and 2, JAX vs PyTorch   (benchmarks/training.py)
     2b. the DPT head's 3x3 kernel gradients, autodiff vs matmul      (benchmarks/kernel_grad.py)
     2c. attention, textbook form vs layers.attention                 (benchmarks/attention.py)
  3. model FLOP utilisation of the JAX train step                  (benchmarks/training.py)
  4. time per depth pixel: dense head vs per-point text queries     (benchmarks/per_point.py)
  5. compilations over a mixed-size epoch; input pipeline vs train step
                                     (benchmarks/compile_epoch.py, benchmarks/loader_throughput.py)

JAX and PyTorch are timed alternately in the same process with the same number of threads
(`torch.set_num_threads(os.cpu_count())`, XLA's CPU client uses one thread per core); every
figure is a median over repeats. `--small` runs a tiny model (smoke test, seconds).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

from benchmarks import attention, common, compile_epoch, inference, kernel_grad, per_point, training


def machine() -> str:
  import jax
  import torch
  cpu = "unknown CPU"
  try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.machine()}; "
          f"Python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def load() -> str:
  return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def loader_figure(timeout_s: int, small: bool) -> None:
  """Figure 5b: runs benchmarks/loader_throughput.py (input pipeline vs train-step consumption)."""
  script = os.path.join(os.path.dirname(__file__), "loader_throughput.py")
  print("\n### 5b. Input pipeline throughput vs train-step consumption (benchmarks/loader_throughput.py)\n")
  if not os.path.exists(script):
    print("(benchmarks/loader_throughput.py not present: skipped)")
    return
  args = ["--batches", "4" if small else "10", "--steps", "2" if small else "3", "--workers", "0,2",
          "--stages", "1", "--synthetic_train", "16"]
  cmd = [sys.executable, "-m", "benchmarks.loader_throughput", *args]
  print(f"`{' '.join(['python', '-m', 'benchmarks.loader_throughput', *args])}`\n", flush=True)
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(res.stdout.strip() or f"(no output; exit {res.returncode}; stderr tail: {res.stderr[-800:]})")
  except subprocess.TimeoutExpired:
    print(f"(loader benchmark exceeded {timeout_s} s: skipped)")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--repeats", type=int, default=5, help="alternating JAX/PyTorch repeats per figure")
  ap.add_argument("--small", action="store_true", help="tiny model (smoke test)")
  ap.add_argument("--loader_timeout", type=int, default=240)
  ap.add_argument("--only", default="1,2,4,5", help="figures to run (3 comes with 2)")
  args = ap.parse_args()
  only = set(args.only.split(","))
  t0 = time.time()
  common.set_threads()
  print(f"Machine: {machine()}")
  print(f"Load average at start (1/5/15 min): {load()}", flush=True)
  setup = common.bench_setup(args.small)
  params = common.init_params(setup)
  c, h = setup.config, setup.head
  print(f"Model: vision {c.vision.depth} x {c.vision.hidden_size}, text {c.text.num_hidden_layers} x "
        f"{c.text.hidden_size} (vocab {c.text.vocab_size}), DPT features {h.features}, projections "
        f"{list(h.out_channels)}, head {h.head_features}; image {common.IMAGE_HW[1]}x{common.IMAGE_HW[0]} "
        f"({common.token_grid()[0] * common.token_grid()[1]} image tokens)", flush=True)
  if "1" in only:
    common.log("figure 1")
    inference.print_results(inference.run(setup, params, args.repeats))
  if "2" in only:
    common.log("figures 2-3")
    training.print_results(training.run(setup, params, args.repeats))
    common.log("figure 2b")
    kernel_grad.print_results(kernel_grad.run(setup, params, args.repeats))
    common.log("figure 2c")
    attention.print_results(attention.run(setup, params, args.repeats))
  if "4" in only:
    common.log("figure 4")
    per_point.print_results(per_point.run(setup, params, args.repeats))
  if "5" in only:
    common.log("figure 5")
    compile_epoch.print_results(compile_epoch.run(setup, params, 2))
    loader_figure(args.loader_timeout, args.small)
  print(f"\nLoad average at end (1/5/15 min): {load()}; suite wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
