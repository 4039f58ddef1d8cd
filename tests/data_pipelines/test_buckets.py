"""Aspect-ratio buckets: which bucket a sample lands in, what resizing into it keeps aligned, how
sources mix over buckets, and that a bucketed iterator resumes exactly."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import stage1
from data_pipelines import pipeline
from data_pipelines.skips import SOURCE_KEY
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.processing import depth_codes
from depthvlm_jax.processing.image_processor import ImageProcessorConfig

# Canonical (fx = 1000) sizes (W, H) of the training sets' images and the paper bucket
# (H, W) each must land in.
CANONICAL = {"waymo": ((932, 621), (640, 960)), "ddad": ((888, 558), (576, 896)),
             "nuscenes": ((1264, 711), (704, 1248)), "argoverse": ((874, 1155), (1152, 864)),
             "scannetpp": ((1342, 1006), (1024, 1344))}


def _write_rgbd(root, name, wh, rng):
  """A random RGB PNG and a uint16 depth PNG (metres * 256, all valid) at size (W, H), fx 1000."""
  w, h = wh
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png", compress_level=0)
  Image.fromarray(rng.integers(256, 256 * 60, (h, w)).astype(np.uint16)).save(root / f"{name}_d.png",
                                                                            compress_level=0)
  return {"image": f"{name}.png", "depth_path": f"{name}_d.png", "depth_scale": 256, "original_rgb_size": [w, h],
          "original_fx": 1000.0, "canonical_fx": 1000.0, "canonical_size": [w, h]}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  rng = np.random.default_rng(0)
  records = {name: _write_rgbd(root, name, wh, rng) for name, (wh, _) in CANONICAL.items()}
  (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
  return root, records


def _specs(buckets, with_answer=False):
  return [pipeline.ExampleSpec(tuple(b), 128, with_answer) for b in buckets]


def test_paper_buckets_take_every_canonical_shape_unskipped(shapes, tokenizer):
  """Each outdoor shape and ScanNet++ goes to its own paper bucket, almost unscaled, never skipped."""
  root, records = shapes
  buckets = [tuple(b) for b in stage1.get_config("paper_4b").data.buckets]
  proc = ImageProcessorConfig()
  for name, ((w, h), want) in CANONICAL.items():
    got = buckets[pipeline.choose_bucket((h, w), buckets, proc.min_pixels, proc.max_pixels)]
    assert got == want, name
    scale, (rh, rw) = pipeline.fit_size((h, w), got)
    assert 0.98 < scale < 1.04 and rh * rw > 0.95 * got[0] * got[1], (name, scale, rh, rw)
  # prepared for real: tiny model config, so only the data path is exercised
  source = pipeline.SourceSpec(str(root / "mixed.jsonl"), str(root), str(root), "synthetic")
  prepare = pipeline.PrepareExample(source, [pipeline.ExampleSpec(b, 2000, False) for b in buckets],
                                    Qwen3VLConfig.tiny(), tokenizer, proc)
  for record in pipeline.load_records(source)[0]:
    ex = prepare(record)
    name = record.image[:-4]
    assert isinstance(ex, dict), (name, ex)
    want = CANONICAL[name][1]
    assert ex["depth"].shape == want
    gh, gw = ex["image_grid_hw"]
    assert gh * 16 <= want[0] and gw * 16 <= want[1] and gh * gw * 16 * 16 > 0.95 * want[0] * want[1]
    assert (ex["depth"] > 0).mean() > 0.95  # only the padding rows/columns are unsupervised


def test_default_buckets_take_every_canonical_shape_unskipped(shapes, tokenizer):
  """The CPU preset's small buckets: the five shapes are scaled down into them, never skipped."""
  root, _ = shapes
  buckets = [tuple(b) for b in stage1.get_config("default").data.buckets]
  source = pipeline.SourceSpec(str(root / "mixed.jsonl"), str(root), str(root), "synthetic")
  prepare = pipeline.PrepareExample(source, _specs(buckets), Qwen3VLConfig.tiny(), tokenizer, ImageProcessorConfig())
  got = {r.image[:-4]: prepare(r) for r in pipeline.load_records(source)[0]}
  assert all(isinstance(e, dict) for e in got.values()), got
  assert {n: e["depth"].shape for n, e in got.items()} == {n: (128, 96) if n == "argoverse" else (96, 128)
                                                          for n in CANONICAL}


def test_depth_stays_aligned_with_the_image_and_scaled_by_the_focal_change(tmp_path, tokenizer):
  """A portrait frame with a white square at a known place and depth 7 m there (3 m elsewhere):
  after resizing into the portrait bucket, the white pixels and the 7 m pixels coincide, the depth
  is divided by the resize factor (the canonical camera's depth), and the padding has no depth."""
  h, w = 300, 200
  rgb = np.zeros((h, w, 3), np.uint8)
  rgb[150:210, 100:160] = 255
  depth = np.full((h, w), 3.0, np.float32)
  depth[150:210, 100:160] = 7.0
  Image.fromarray(rgb).save(tmp_path / "a.png")
  Image.fromarray((depth * 1000).astype(np.uint16)).save(tmp_path / "a_d.png")
  rec = {"image": "a.png", "depth_path": "a_d.png", "depth_scale": 1000, "original_fx": 1000.0,
         "canonical_size": [w, h]}
  (tmp_path / "a.jsonl").write_text(json.dumps(rec) + "\n")
  source = pipeline.SourceSpec(str(tmp_path / "a.jsonl"), str(tmp_path), str(tmp_path), "synthetic")
  prepare = pipeline.PrepareExample(source, _specs([(96, 128), (128, 96)]), Qwen3VLConfig.tiny(), tokenizer,
                                    ImageProcessorConfig())
  ex = prepare(pipeline.load_records(source)[0][0])
  assert ex["depth"].shape == (128, 96)
  s = min(128 / h, 96 / w)  # 0.4267: 128 x 85 pixels, 11 columns of padding
  rw = round(w * s)
  gh, gw = ex["image_grid_hw"] * 16
  image = ex["pixels"][:gh, :gw].astype(np.float32) / 127.5 - 1  # values in [-1, 1] as the processor's
  assert image.shape[:2] == (128, 96)
  white = image.mean(-1) > 0.5
  metres = depth_codes.batch_depth(ex)
  assert ex["depth"].dtype == np.uint16 and set(np.unique(ex["depth"])) == {0, 3000, 7000}  # the PNG's codes
  far = metres > 5 / s
  # the square, from either map, sits where the resize puts it
  for mask in (white, far):
    ys, xs = np.nonzero(mask)
    assert abs(ys.mean() - 180 * s) < 1 and abs(xs.mean() - 130 * s) < 1
  assert (white != far).sum() <= 0.1 * far.sum()  # differ at most on the square's border pixels
  np.testing.assert_allclose(np.unique(metres[:, :rw]), [3.0 / s, 7.0 / s], rtol=1e-6)
  assert (ex["depth"][:, rw:] == 0).all()  # padding: no supervision
  assert np.abs(image[:, rw + 1:]).max() < 0.01  # grey padding pixels


def _plan(tmp_path, counts_by_shape):
  """Sources of records that only carry canonical sizes: {name: [(n, (W, H)), ...]}."""
  sources = []
  for name, parts in counts_by_shape.items():
    lines = [json.dumps({"image": f"{name}{i}_{j}.png", "canonical_size": list(wh)})
             for i, (n, wh) in enumerate(parts) for j in range(n)]
    (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    sources.append(pipeline.SourceSpec(str(tmp_path / f"{name}.jsonl"), str(tmp_path), str(tmp_path), name=name))
  return sources


class _SourceOnly:
  """Stands in for `PrepareExample` where only which source a sample came from matters."""

  def __init__(self, source, spec):
    self.label, self.bucket = source.label, spec.image_size

  def __call__(self, record, rng=None):
    return {SOURCE_KEY: self.label, "h": np.int32(self.bucket[0])}


@pytest.mark.parametrize("weights", [None, (1.0, 1.0, 2.0)])
def test_mixing_follows_the_weights_over_buckets(tmp_path, tokenizer, weights):
  """Three sources of 300 / 150 / 50 records spread unevenly over two buckets: over 10,000 samples each
  source's share is within 2% of its weight (default: its record count), and every batch holds one
  bucket."""
  land, port = (1000, 750), (750, 1000)
  sources = _plan(tmp_path, {"a": [(200, land), (100, port)], "b": [(150, port)], "c": [(50, land)]})
  ds = pipeline.make_dataset(sources, [None] * 3 if weights is None else weights,
                             _specs([(96, 128), (128, 96)]), Qwen3VLConfig.tiny(), tokenizer,
                             ImageProcessorConfig(), seed=0, prepare=_SourceOnly)
  assert ds.records == [300, 150, 50]
  it = iter(pipeline.batched(ds, 8))
  drawn = np.zeros(3)
  for _ in range(10_000 // 8):
    b = next(it)
    assert len(set(b["h"].tolist())) == 1
    drawn += b["drawn_counts"].sum(0)
  want = np.array([300, 150, 50] if weights is None else weights, float)
  share, want = drawn / drawn.sum(), want / want.sum()
  assert np.all(np.abs(share / want - 1) < 0.02), (share, want)
