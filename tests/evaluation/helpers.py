"""Small on-disk RGB-D datasets for the evaluation tests (written into a pytest tmp_path)."""

import json
import pathlib

import numpy as np
from PIL import Image

from depthvlm_jax.model.depthvlm import random_params  # noqa: F401  (re-exported for the tests)


def write_dataset(root: pathlib.Path, n: int = 5, seed: int = 0, rgb_wh=(64, 48), depth_wh=(32, 24),
                  extra: dict | None = None) -> pathlib.Path:
  """n records: RGB rgb_wh, uint16 mm depth depth_wh, canonical = RGB size, sparse points in depth
  pixels with their exact depth values; returns the jsonl path."""
  rng = np.random.default_rng(seed)
  (root / "rgb").mkdir(parents=True, exist_ok=True)
  (root / "depth").mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (rgb_wh[1], rgb_wh[0], 3), dtype=np.uint8)).save(root / "rgb" / f"{i}.png")
    mm = rng.integers(500, 6000, (depth_wh[1], depth_wh[0])).astype(np.uint16)
    mm[rng.random(mm.shape) < 0.1] = 0
    Image.fromarray(mm).save(root / "depth" / f"{i}.png")
    xy = np.stack([rng.integers(0, depth_wh[0], 6), rng.integers(0, depth_wh[1], 6)], 1)
    rec = {"image": f"{i}.png", "depth_path": f"{i}.png", "depth_scale": 1000.0,
           "original_rgb_size": list(rgb_wh), "original_depth_size": list(depth_wh), "original_fx": 1000.0,
           "canonical_fx": 1000.0, "canonical_size": list(rgb_wh), "pixel_coords": xy.tolist(),
           "depth": [float(mm[y, x]) / 1000.0 for x, y in xy]}
    rec.update(extra or {})
    lines.append(json.dumps(rec))
  path = root / "ann.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def import_qwen_vl_utils():
  """The reference `qwen_vl_utils` (qwen-vl-utils 0.0.14, a test dependency).

  It imports torchvision at module level for its video readers, and torchvision has no CPU wheel for
  our torch here. The image functions the tests call (`smart_resize`, `fetch_image`,
  `process_vision_info` on PIL images) never touch it, so when torchvision is absent the module is
  imported against a placeholder that is removed again right after the import (transformers is
  imported first so its own torchvision check never sees the placeholder).
  """
  import importlib
  import sys
  import types
  import transformers  # noqa: F401
  try:
    return importlib.import_module("qwen_vl_utils")
  except ModuleNotFoundError as e:
    if e.name != "torchvision":
      raise
  tv, tv_io, tv_tr = (types.ModuleType(n) for n in ("torchvision", "torchvision.io", "torchvision.transforms"))
  tv.__version__, tv.io, tv.transforms, tv_tr.InterpolationMode = "0.0", tv_io, tv_tr, None
  names = {"torchvision": tv, "torchvision.io": tv_io, "torchvision.transforms": tv_tr}
  sys.modules.update(names)
  try:
    for n in [m for m in sys.modules if m.startswith("qwen_vl_utils")]:
      del sys.modules[n]
    return importlib.import_module("qwen_vl_utils")
  finally:
    for n in names:
      sys.modules.pop(n, None)
