"""Patches made on the device from uint8 pixels equal the host processor's, bit for bit in float32."""

import jax
import numpy as np
import pytest

from depthvlm_jax.processing.device_patches import host_patches, model_pixel_values, patches_from_pixels
from depthvlm_jax.processing.image_processor import ImageProcessorConfig, normalize_and_patchify

CLIP = ImageProcessorConfig(image_mean=(0.48145466, 0.4578275, 0.40821073),
                            image_std=(0.26862954, 0.26130258, 0.27577711))


@pytest.mark.parametrize("config", [ImageProcessorConfig(), CLIP], ids=["qwen3vl", "clip_stats"])
def test_device_patches_equal_the_host_processor_bit_exactly(config):
  """A (96, 160) bucket holding images of several grids (full, narrower, shorter, one merge block,
  an empty slot): each row set is `normalize_and_patchify` of the image's own grid, then zero rows."""
  rng = np.random.default_rng(0)
  grids = np.asarray([(6, 10), (4, 6), (6, 4), (2, 2), (0, 0)], np.int32)
  pixels = rng.integers(0, 256, (len(grids), 96, 160, 3), dtype=np.uint8)
  got = np.asarray(jax.jit(lambda p, g: patches_from_pixels(p, g, config))(pixels, grids))
  assert got.dtype == np.float32 and got.shape == (len(grids), 6 * 10, 3 * 2 * 16 * 16)
  for i, (gh, gw) in enumerate(grids):
    want = normalize_and_patchify(pixels[i, :gh * 16, :gw * 16], config)[0] if gh else np.zeros((0, 1536))
    np.testing.assert_array_equal(got[i, :len(want)], want)
    assert not got[i, len(want):].any()
    np.testing.assert_array_equal(got[i], host_patches(pixels[i], (gh, gw), config))


def test_every_uint8_level_normalises_as_on_the_host():
  levels = np.arange(256, dtype=np.uint8).reshape(8, 32, 1).repeat(3, axis=2)
  image = np.tile(levels, (4, 2, 1))  # (32, 64, 3): every level in every channel
  image[..., 1] = image[..., 1][::-1]
  got = np.asarray(patches_from_pixels(image[None], np.asarray([[2, 4]]), CLIP))[0]
  np.testing.assert_array_equal(got, normalize_and_patchify(image, CLIP)[0])


def test_batches_with_host_rows_keep_them():
  rows = np.ones((1, 4, 1536), np.float32)
  assert model_pixel_values({"pixel_values": rows, "pixels": None}) is rows


def test_pixels_of_a_bad_shape_are_refused():
  with pytest.raises(ValueError, match="multiples of 32"):
    patches_from_pixels(np.zeros((1, 48, 64, 3), np.uint8), np.asarray([[2, 4]]))
