"""Image processor parity with the transformers PIL Qwen2-VL processor configured like Qwen3-VL."""

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from depthvlm_jax.processing import image_processor as ip

CFG = ip.ImageProcessorConfig()


@pytest.fixture(scope="module")
def hf_processor():
  return Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3,
                                  size={"shortest_edge": CFG.min_pixels, "longest_edge": CFG.max_pixels})


@pytest.mark.parametrize("wh", [(640, 480), (300, 1000), (1000, 300), (97, 211), (4100, 4300)])
def test_pixel_values_and_grid_match_transformers(hf_processor, wh):
  rng = np.random.default_rng(sum(wh))
  image = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
  want = hf_processor(images=[image], return_tensors="np")
  got, grid = ip.preprocess_image(image, CFG)
  np.testing.assert_array_equal(grid, want["image_grid_thw"][0])
  assert got.shape == want["pixel_values"].shape
  assert np.abs(got - want["pixel_values"]).max() < 1e-6


def test_smart_resize_rules():
  assert ip.smart_resize(480, 640) == (480, 640)
  assert ip.smart_resize(100, 100) == (256, 256)  # up to min_pixels
  h, w = ip.smart_resize(10000, 8000)
  assert h % 32 == 0 and w % 32 == 0 and h * w <= CFG.max_pixels
  with pytest.raises(ValueError, match="aspect ratio"):
    ip.smart_resize(10, 3000)


def test_mode_conversions(tmp_path):
  grey16 = Image.fromarray(np.full((64, 64), 65535, np.uint16))
  assert np.asarray(ip.to_rgb(grey16)).max() == 255
  rgba = Image.fromarray(np.full((32, 32, 4), 200, np.uint8), "RGBA")
  assert np.asarray(ip.to_rgb(rgba)).shape == (32, 32, 3)
  img = Image.fromarray(np.zeros((32, 64, 3), np.uint8))
  exif = img.getexif()
  exif[0x0112] = 6  # rotate 90° on display
  img.save(tmp_path / "r.jpg", exif=exif)
  assert ip.to_rgb(Image.open(tmp_path / "r.jpg")).size == (32, 64)
  with pytest.raises(ValueError, match="multiples of 32"):
    ip.normalize_and_patchify(np.zeros((33, 64, 3), np.uint8))
