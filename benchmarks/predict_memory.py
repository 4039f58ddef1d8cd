"""Peak memory of `python -m depthvlm_jax.predict` per input pixel, beyond the model.

  python -m benchmarks.predict_memory [--small 640x480] [--large 6000x4000]

Runs the predict CLI (tiny random DepthVLM of the default preset, exported once to a temporary
folder) on a small and a large image, each in its own process, and reads each process's peak
resident memory (`ru_maxrss` of `os.wait4`). The model, compiled programs and the fixed-size
canonical image cost the same for both, so (peak_large - peak_small) / (pixels_large - pixels_small)
is what every further input pixel costs: decoding, the depth map at full resolution and the
outputs (npy, 16-bit PNG, Turbo visualisation, PLY point cloud).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image


def _size(text: str) -> tuple[int, int]:
  w, h = (int(v) for v in text.lower().split("x"))
  return w, h


def make_image(path: pathlib.Path, wh: tuple[int, int]) -> None:
  """A smooth colour gradient with mild noise, saved as JPEG (decodes like a photo)."""
  w, h = wh
  rng = np.random.default_rng(0)
  img = Image.new("RGB", (w, h))
  rows = 512
  for r0 in range(0, h, rows):
    r1 = min(h, r0 + rows)
    y = np.arange(r0, r1, dtype=np.float32)[:, None] / h
    x = np.arange(w, dtype=np.float32)[None, :] / w
    chunk = np.stack(np.broadcast_arrays(255 * x, 255 * y, 128 + 64 * np.sin(20 * x + 10 * y)), -1)
    chunk = chunk + rng.normal(0, 6, chunk.shape).astype(np.float32)
    img.paste(Image.fromarray(np.clip(chunk, 0, 255).astype(np.uint8)), (0, r0))
  img.save(path, quality=90)


def make_model(directory: pathlib.Path) -> None:
  import flax.linen as nn
  import jax

  from configs import stage1
  from depthvlm_jax import export
  from depthvlm_jax.model.depthvlm import depthvlm_dummy_inputs
  from depthvlm_jax.runs import model_from_config
  model = model_from_config.build_model(stage1.get_config("default"))
  params = jax.jit(lambda r: nn.unbox(model.init(r, **depthvlm_dummy_inputs(model.config))["params"]))(jax.random.key(0))
  export.write_hf_dir(jax.device_get(params), model.config, model.head, directory)


def peak_rss_bytes(cmd: list[str]) -> int:
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _, status, usage = os.wait4(proc.pid, 0)
  err = proc.stderr.read().decode()
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
  return usage.ru_maxrss * 1024  # kilobytes on Linux


def main(argv=None) -> dict[str, float]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", type=_size, default=(640, 480))
  ap.add_argument("--large", type=_size, default=(6000, 4000))
  args = ap.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    make_model(tmp / "model")
    peaks = {}
    for name, wh in (("small", args.small), ("large", args.large)):
      make_image(tmp / f"{name}.jpg", wh)
      cmd = [sys.executable, "-m", "depthvlm_jax.predict", f"--model={tmp / 'model'}", f"--image={tmp / name}.jpg",
             f"--out={tmp / ('out_' + name)}", "--max_new_tokens=2"]
      peaks[name] = peak_rss_bytes(cmd)
      print(f"{name}: {wh[0]}x{wh[1]} = {wh[0] * wh[1] / 1e6:.2f} MP, peak RSS {peaks[name] / 2**20:.0f} MiB")
  pixels = args.large[0] * args.large[1] - args.small[0] * args.small[1]
  per_pixel = (peaks["large"] - peaks["small"]) / pixels
  print(f"peak memory per input pixel beyond the model: {per_pixel:.1f} bytes")
  return {"small_peak_bytes": peaks["small"], "large_peak_bytes": peaks["large"], "bytes_per_pixel": per_pixel}


if __name__ == "__main__":
  main()
