"""NumPy/PIL image processor equivalent to the Qwen2-VL/Qwen3-VL processor of `transformers`.

Steps: RGB conversion (EXIF rotation applied) → `smart_resize` to multiples of 32 within
[min_pixels, max_pixels] (bicubic) → ×1/255 → (x − 0.5)/0.5 → patchify into
(grid_h*grid_w, C*T*P*P) rows in spatial-merge-block order, the still image repeated over the
T = 2 temporal slots. DepthVLM resizes to a canonical size itself and then calls
`normalize_and_patchify` on an image whose sides are already multiples of 32.

Two preprocessing choices (`PREPROCESSING`):
  "direct":   one bicubic resize to the processor's `smart_resize` (multiples of 32);
  "official": what the authors' evaluation feeds the model: `qwen_vl_utils.process_vision_info`
              (qwen-vl-utils 0.0.14) first resizes to its own smart size in multiples of 28
              (`qwen_vl_utils_size`, bicubic), then the processor resizes that to multiples of 32.
              A ScanNet++ canonical 1006x1342 image becomes 1008x1344, then 1024x1344 (direct: 992x1344).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
from PIL import Image, ImageOps


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  patch_size: int = 16
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = 65536  # Qwen3-VL `size.shortest_edge`
  max_pixels: int = 16777216  # Qwen3-VL `size.longest_edge`
  image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  @classmethod
  def from_hf_dir(cls, path: str | pathlib.Path) -> "ImageProcessorConfig":
    """Reads `preprocessor_config.json` when present (defaults otherwise)."""
    f = pathlib.Path(path) / "preprocessor_config.json"
    if not f.exists():
      return cls()
    d = json.loads(f.read_text())
    size = d.get("size") or {}
    return cls(patch_size=d.get("patch_size", 16), temporal_patch_size=d.get("temporal_patch_size", 2),
               merge_size=d.get("merge_size", 2),
               min_pixels=size.get("shortest_edge", d.get("min_pixels", cls.min_pixels)),
               max_pixels=size.get("longest_edge", d.get("max_pixels", cls.max_pixels)),
               image_mean=tuple(d.get("image_mean", cls.image_mean)), image_std=tuple(d.get("image_std", cls.image_std)))

  def to_hf_dict(self) -> dict:
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "resample": 3, "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "image_mean": list(self.image_mean), "image_std": list(self.image_std)}

  def save(self, directory: str | pathlib.Path) -> None:
    (pathlib.Path(directory) / "preprocessor_config.json").write_text(json.dumps(self.to_hf_dict(), indent=2))


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
  """Closest (h, w) multiples of `factor` with h*w in [min_pixels, max_pixels], aspect kept."""
  if min(height, width) <= 0:
    raise ValueError(f"image size {height}x{width} is empty")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} of {height}x{width} exceeds 200")
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


# qwen-vl-utils 0.0.14 image defaults: patch 14 x merge 2 = factor 28, 4 to 16384 tokens of 28x28 pixels.
QWEN_VL_UTILS_FACTOR = 28
QWEN_VL_UTILS_MIN_PIXELS = 4 * 28 * 28
QWEN_VL_UTILS_MAX_PIXELS = 16384 * 28 * 28
PREPROCESSING = ("direct", "official")


def qwen_vl_utils_size(height: int, width: int, factor: int = QWEN_VL_UTILS_FACTOR,
                       min_pixels: int = QWEN_VL_UTILS_MIN_PIXELS,
                       max_pixels: int = QWEN_VL_UTILS_MAX_PIXELS) -> tuple[int, int]:
  """qwen-vl-utils' smart size: as `smart_resize`, except that each rounded side is at least `factor`
  before the pixel-count checks and the shrinking branch has no such floor."""
  if min(height, width) <= 0:
    raise ValueError(f"image size {height}x{width} is empty")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} of {height}x{width} exceeds 200")
  h = max(factor, round(height / factor) * factor)
  w = max(factor, round(width / factor) * factor)
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
  return h, w


def processed_size(height: int, width: int, config: "ImageProcessorConfig", preprocessing: str = "direct"):
  """(H, W) in multiples of `config.factor` that an image of height x width reaches the model at."""
  if preprocessing == "official":
    height, width = qwen_vl_utils_size(height, width)
  elif preprocessing != "direct":
    raise ValueError(f"preprocessing={preprocessing!r}; expected one of {PREPROCESSING}")
  return smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)


def official_first_resize(image: Image.Image | np.ndarray) -> Image.Image:
  """The qwen-vl-utils step of "official" preprocessing: RGB (RGBA composited on white, no EXIF
  rotation) resized bicubically to `qwen_vl_utils_size`."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  if image.mode == "RGBA":
    rgb = Image.new("RGB", image.size, (255, 255, 255))
    rgb.paste(image, mask=image.getchannel("A"))
    image = rgb
  else:
    image = image.convert("RGB")
  h, w = qwen_vl_utils_size(image.height, image.width)
  return image.resize((w, h), Image.Resampling.BICUBIC)


def to_rgb(image: Image.Image | np.ndarray, exif_transpose: bool = True) -> Image.Image:
  """Any PIL image / HxW[xC] array -> 8-bit RGB PIL image (EXIF orientation applied unless told not to).

  16-bit grey images are scaled (not clipped) to 8 bits; alpha is dropped (composited on black as
  PIL's convert does).
  """
  if isinstance(image, np.ndarray):
    arr = image
    if arr.dtype == np.uint16:
      arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
    image = Image.fromarray(arr)
  else:
    if exif_transpose:
      image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
      arr = np.asarray(image).astype(np.float32)
      scale = 257.0 if arr.max() > 255 or image.mode.startswith("I;16") else 1.0
      image = Image.fromarray(np.clip(arr / scale, 0, 255).round().astype(np.uint8))
  return image.convert("RGB")


def normalize_and_patchify(image: np.ndarray, config: ImageProcessorConfig = ImageProcessorConfig()):
  """(H, W, 3) uint8 RGB with H, W multiples of 32 -> (pixel_values (N, 1536) float32, grid_thw (3,))."""
  h, w = image.shape[:2]
  f = config.factor
  if h % f or w % f or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image of shape {image.shape}: expected (H, W, 3) with H, W multiples of {f}")
  x = image.astype(np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
  mean = np.asarray(config.image_mean, np.float32)[:, None, None]
  std = np.asarray(config.image_std, np.float32)[:, None, None]
  x = (x - mean) / std
  return patchify(x, config)


def patchify(x: np.ndarray, config: ImageProcessorConfig = ImageProcessorConfig()):
  """(C, H, W) normalised float image -> ((gh*gw, C*T*P*P) rows in merge-block order, [1, gh, gw])."""
  c, h, w = x.shape
  p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
  gh, gw = h // p, w // p
  patches = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
  patches = np.broadcast_to(patches[:, :, :, :, :, None], patches.shape[:5] + (t,) + patches.shape[5:])
  return np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p), np.float32), np.array([1, gh, gw])


def preprocess_image(image: Image.Image | np.ndarray, config: ImageProcessorConfig = ImageProcessorConfig(),
                     size: tuple[int, int] | None = None, preprocessing: str = "direct"):
  """Like the HF processor on one image: resize (smart_resize, or exactly `size`=(H, W)) and patchify.

  `preprocessing="official"` first applies `official_first_resize` (the qwen-vl-utils step); `size`
  is then the final size (`processed_size(..., "official")`).
  """
  if preprocessing == "official":
    image = official_first_resize(image)
  elif preprocessing != "direct":
    raise ValueError(f"preprocessing={preprocessing!r}; expected one of {PREPROCESSING}")
  rgb = to_rgb(image)
  if size is None:
    size = smart_resize(rgb.height, rgb.width, config.factor, config.min_pixels, config.max_pixels)
  if (rgb.height, rgb.width) != tuple(size):
    rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
  return normalize_and_patchify(np.asarray(rgb), config)
