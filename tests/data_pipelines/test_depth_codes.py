"""Depth targets as 16-bit codes: integer depth files travel exactly, float files within half a unit."""

import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from data_pipelines import pipeline, rgbd
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.processing import depth_codes
from depthvlm_jax.processing.image_processor import ImageProcessorConfig

FRAMES = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "scannetpp_examples"
# buckets that resize the canonical 1342x1006 frames by factors != 1 (nearest-neighbour depth)
BUCKETS = [pipeline.ExampleSpec((192, 256), 256, False), pipeline.ExampleSpec((256, 192), 256, False),
           pipeline.ExampleSpec((1024, 1344), 2000, False)]


def _float_target(sample, spec):
  """The depth target in float32 metres as the loader made it before codes: the canonical map
  resized into the bucket and divided by the resize factor."""
  _, depth, s = pipeline.fit_to_bucket(sample.image, sample.depth, spec.image_size, 32)
  return depth, s


@pytest.mark.skipif(not FRAMES.exists(), reason="needs the sample ScanNet++ frames")
def test_png_depth_travels_as_its_codes(tokenizer):
  """Real 16-bit ScanNet++ depth PNGs: the codes sent are the file's integers (no rounding); their
  decoded metres, on the host and in a jitted program, are the same float32 bits, within 2 units in
  the last place of the two-division float32 target, with exactly its valid pixels."""
  source = pipeline.SourceSpec(str(FRAMES / "examples.jsonl"), str(FRAMES / "rgb"), str(FRAMES / "depth"),
                               "scannetpp")
  records = pipeline.load_records(source)[0]
  decode = jax.jit(depth_codes.decode)
  seen = 0
  for spec in BUCKETS:
    prepare = pipeline.PrepareExample(source, spec, Qwen3VLConfig.tiny(), tokenizer, ImageProcessorConfig())
    for record in records:
      ex = prepare(record)
      sample = pipeline.load_canonical(record, source)
      want, s = _float_target(sample, spec)
      assert ex["depth"].dtype == np.uint16 and ex["depth_unit"].dtype == np.float32
      assert ex["depth_unit"] == np.float32(1 / (record.depth_scale * s))
      codes = np.rint(want.astype(np.float64) * record.depth_scale * s)
      np.testing.assert_array_equal(ex["depth"], codes)  # the PNG's integers, resized, unchanged
      host = depth_codes.batch_depth(ex)
      np.testing.assert_array_equal(np.asarray(decode(ex["depth"][None], ex["depth_unit"][None]))[0], host)
      np.testing.assert_array_equal(host > 0, want > 0)
      np.testing.assert_allclose(host, want, rtol=2.4e-7, atol=0)
      seen += int((host > 0).sum())
  assert seen > 100_000


def test_integer_codes_refuses_maps_that_are_not_integers_over_the_scale():
  raw = np.array([[0, 1, 65535], [1234, 40000, 7]], np.uint16)
  depth = raw.astype(np.float32) / np.float32(1000)
  np.testing.assert_array_equal(depth_codes.integer_codes(depth, 1000.0), raw)
  assert depth_codes.integer_codes(depth + np.float32(1e-4), 1000.0) is None  # not codes / 1000
  assert depth_codes.integer_codes(np.float32([[70.0]]), 1000.0) is None  # 70000 does not fit 16 bits


def test_float_depth_fits_its_own_unit(tmp_path, tokenizer):
  """A binary float32 depth file: the largest depth is code 65535, every valid pixel decodes within
  half a unit (max / 131070) of the float32 target, invalid pixels stay 0 and valid ones valid."""
  rng = np.random.default_rng(0)
  h, w = 60, 80
  depth = rng.uniform(0.05, 79.0, (h, w)).astype(np.float32)
  depth[:5] = 0.0  # invalid rows
  depth[10, 10] = 0.0500001  # the range's smallest depth
  depth.tofile(tmp_path / "d.bin")
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "a.png")
  rec = {"image": "a.png", "depth_path": "d.bin", "depth_format": "binary_float32", "depth_scale": 1.0,
         "original_rgb_size": [w, h], "original_fx": 1000.0, "canonical_size": [w, h]}
  (tmp_path / "a.jsonl").write_text(json.dumps(rec) + "\n")
  source = pipeline.SourceSpec(str(tmp_path / "a.jsonl"), str(tmp_path), str(tmp_path), "synthetic")
  spec = pipeline.ExampleSpec((64, 96), 128, False)
  record = pipeline.load_records(source)[0][0]
  ex = pipeline.PrepareExample(source, spec, Qwen3VLConfig.tiny(), tokenizer, ImageProcessorConfig())(record)
  want, _ = _float_target(pipeline.load_canonical(record, source), spec)
  unit = float(ex["depth_unit"])
  assert unit == np.float32(want.max() / 65535) and ex["depth"].max() == 65535
  got = depth_codes.batch_depth(ex)
  np.testing.assert_array_equal(got > 0, want > 0)
  err = np.abs(got.astype(np.float64) - want)
  assert err.max() <= 0.5 * unit * (1 + 1e-6) and err.max() > 0.25 * unit  # the bound, and it is reached
  assert 0.5 * unit <= 80.0 / 131070 * (1 + 1e-6)


def test_empty_and_fitted_edge_cases():
  codes, unit = depth_codes.fitted(np.zeros((3, 4), np.float32))
  assert not codes.any() and unit == 0
  codes, unit = depth_codes.fitted(np.float32([[1e-9, 0.0, 10.0]]))
  assert codes.tolist() == [[1, 0, 65535]]  # a tiny valid depth keeps code 1: still valid


def test_range_clipping_happens_before_encoding(tmp_path, tokenizer):
  """Depth outside the dataset's range is 0 (invalid) on the host, so it is code 0 on the device."""
  h, w = 64, 96
  raw = np.full((h, w), 3000, np.uint16)
  raw[:, :10] = 20000  # 20 m: beyond nyuv2's 10 m
  Image.fromarray(raw).save(tmp_path / "d.png")
  Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "a.png")
  rec = {"image": "a.png", "depth_path": "d.png", "depth_scale": 1000, "original_fx": 1000.0,
         "canonical_size": [w, h]}
  (tmp_path / "a.jsonl").write_text(json.dumps(rec) + "\n")
  source = pipeline.SourceSpec(str(tmp_path / "a.jsonl"), str(tmp_path), str(tmp_path), "nyuv2")
  ex = pipeline.PrepareExample(source, pipeline.ExampleSpec((64, 96), 128, False), Qwen3VLConfig.tiny(),
                               tokenizer, ImageProcessorConfig())(pipeline.load_records(source)[0][0])
  assert (ex["depth"][:, :10] == 0).all() and (ex["depth"][:, 10:] == 3000).all()
  assert rgbd.DATASET_DEPTH_RANGES["nyuv2"][1] == 10.0
