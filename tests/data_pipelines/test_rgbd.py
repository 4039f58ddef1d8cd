"""RGB-D readers: real ScanNet++ frames follow focal unification; every bad-input kind is caught with a reason."""

import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import rgbd
from tests.conftest import SHARED_DATA

FRAMES = SHARED_DATA / "scannetpp_examples"
needs_frames = pytest.mark.skipif(not FRAMES.exists(), reason=f"{FRAMES} not present")


@needs_frames
def test_scannetpp_frames_canonical_sizes_and_arrays():
  records, errors = rgbd.read_jsonl(FRAMES / "examples.jsonl")
  assert len(records) == 4 and not errors
  for r in records:
    expected_wh = (round(1920 * 1000 / r.original_fx), round(1440 * 1000 / r.original_fx))
    assert r.canonical_size == expected_wh
    s = rgbd.load_sample(r, FRAMES / "rgb", FRAMES / "depth", "scannetpp")
    assert s.image.shape == (expected_wh[1], expected_wh[0], 3) and s.depth.shape == expected_wh[::-1]
    # independent computation of the same rules with PIL / NumPy indexing
    rgb = Image.open(FRAMES / "rgb" / r.image).convert("RGB").resize(expected_wh, Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(s.image, np.asarray(rgb))
    raw = np.asarray(Image.open(FRAMES / "depth" / r.depth_path)).astype(np.float32) / 1000.0
    ys = np.minimum(((np.arange(expected_wh[1]) + 0.5) * 192 / expected_wh[1]).astype(int), 191)
    xs = np.minimum(((np.arange(expected_wh[0]) + 0.5) * 256 / expected_wh[0]).astype(int), 255)
    want = raw[ys][:, xs]
    want = np.where((want >= 0.001) & (want <= 10), want, 0)
    np.testing.assert_array_equal(s.depth, want)
    assert s.depth.max() <= 10 and (s.depth > 0).mean() > 0.5


def _write(tmp_path, record, rgb=None, depth=None):
  (tmp_path / "rgb").mkdir(exist_ok=True)
  (tmp_path / "depth").mkdir(exist_ok=True)
  if rgb is not None:
    rgb.save(tmp_path / "rgb" / record["image"])
  if depth is not None:
    Image.fromarray(depth).save(tmp_path / "depth" / record["depth_path"])
  return rgbd.parse_record(record, "test:1")


BASE = {"image": "a.png", "depth_path": "a.png", "depth_scale": 1000.0, "original_fx": 100.0, "canonical_fx": 100.0}
RGB = Image.fromarray(np.full((40, 60, 3), 128, np.uint8))
DEPTH = np.full((40, 60), 2000, np.uint16)


def test_valid_small_sample(tmp_path):
  r = _write(tmp_path, dict(BASE, canonical_fx=50.0), RGB, DEPTH)
  s = rgbd.load_sample(r, tmp_path / "rgb", tmp_path / "depth", "nyuv2")
  assert s.image.shape == (20, 30, 3) and np.all(s.depth == 2.0)


@pytest.mark.parametrize("kind", ["unreadable_image", "missing_depth", "corrupt_depth", "no_valid_depth"])
def test_bad_samples_raise_with_reason(tmp_path, kind):
  r = _write(tmp_path, BASE, RGB, DEPTH)
  if kind == "unreadable_image":
    (tmp_path / "rgb" / "a.png").write_bytes(b"not an image")
  elif kind == "missing_depth":
    (tmp_path / "depth" / "a.png").unlink()
  elif kind == "corrupt_depth":
    data = (tmp_path / "depth" / "a.png").read_bytes()
    (tmp_path / "depth" / "a.png").write_bytes(data[:len(data) // 2])
  else:
    Image.fromarray(np.full((40, 60), 50000, np.uint16)).save(tmp_path / "depth" / "a.png")  # 50 m > nyu max
  with pytest.raises(rgbd.SampleError) as e:
    rgbd.load_sample(r, tmp_path / "rgb", tmp_path / "depth", "nyuv2")
  assert e.value.reason == kind


def test_nan_inf_negative_depth_become_invalid(tmp_path):
  raw = np.full((4, 5), 2.0, np.float32)
  raw[0, 0], raw[1, 1], raw[2, 2] = np.nan, np.inf, -1.0
  raw.tofile(tmp_path / "d.bin")
  d = rgbd.load_depth(tmp_path / "d.bin", 1.0, "binary_float32", (5, 4))
  assert (d == 0).sum() == 3 and np.all(np.isfinite(d))
  with pytest.raises(rgbd.SampleError, match="expected 6x4"):
    rgbd.load_depth(tmp_path / "d.bin", 1.0, "binary_float32", (6, 4))


def test_wrong_field_types_and_bad_json_are_collected(tmp_path):
  lines = [json.dumps(BASE), json.dumps(dict(BASE, depth_scale="1000")), "{broken",
           json.dumps(dict(BASE, canonical_size=[1.5, 2])), json.dumps({"depth_path": "x"}), json.dumps([1])]
  (tmp_path / "a.jsonl").write_text("\n".join(lines))
  records, errors = rgbd.read_jsonl(tmp_path / "a.jsonl")
  assert len(records) == 1 and len(errors) == 5
  msgs = " | ".join(map(str, errors))
  assert "a.jsonl:2: field 'depth_scale' must be a positive number" in msgs
  assert "a.jsonl:3: invalid JSON" in msgs and "'canonical_size'" in msgs and "missing required field 'image'" in msgs


def test_paths_escaping_the_root_are_refused(tmp_path):
  for rel in ["../etc/passwd", "/etc/passwd", "a/../../x.png"]:
    with pytest.raises(rgbd.SampleError, match="absolute|escapes"):
      rgbd.resolve_path(tmp_path, rel)


def test_image_modes_are_converted_to_8bit_rgb(tmp_path):
  grey = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) % 256
  wide = (np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) * 27 % 65536).astype(np.uint16)
  rgba = np.random.default_rng(0).integers(0, 256, (40, 60, 4), dtype=np.uint8)
  cases = {"L": (Image.fromarray(grey.astype(np.uint8)), np.repeat(grey[..., None], 3, -1)),
           "I;16": (Image.fromarray(wide), np.repeat(np.round(wide / 257.0)[..., None], 3, -1)),
           "RGBA": (Image.fromarray(rgba, "RGBA"), rgba[..., :3])}  # alpha dropped, colour kept
  for mode, (img, want) in cases.items():
    assert img.mode == mode
    img.save(tmp_path / f"{mode}.png")
    out = rgbd.load_rgb(tmp_path / f"{mode}.png")
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3), mode
    np.testing.assert_array_equal(out, want.astype(np.uint8), err_msg=mode)


@pytest.mark.parametrize("orientation, rotate", [(6, -1), (8, 1), (3, 2)])
def test_exif_rotation_is_applied(tmp_path, orientation, rotate):
  """A JPEG stored sideways with an EXIF Orientation tag is read as displayed (np.rot90 reference)."""
  stored = np.zeros((64, 48, 3), np.uint8)  # blocks of flat colour survive JPEG compression
  stored[:32, :24] = (255, 0, 0)
  stored[:32, 24:] = (0, 255, 0)
  stored[32:, :24] = (0, 0, 255)
  stored[32:, 24:] = (255, 255, 255)
  img = Image.fromarray(stored)
  exif = img.getexif()
  exif[0x0112] = orientation
  img.save(tmp_path / "e.jpg", exif=exif, quality=95)
  assert Image.open(tmp_path / "e.jpg").getexif()[0x0112] == orientation
  out = rgbd.load_rgb(tmp_path / "e.jpg")
  want = np.rot90(stored, k=rotate)  # k=-1: clockwise
  assert out.shape == want.shape
  assert np.abs(out.astype(int) - want).mean() < 3

  # through the full reader: the record's original_rgb_size is the displayed size
  depth = np.full(want.shape[:2], 1500, np.uint16)
  Image.fromarray(depth).save(tmp_path / "d.png")
  r = rgbd.parse_record({"image": "e.jpg", "depth_path": "d.png", "depth_scale": 1000.0, "original_fx": 100.0,
                         "canonical_fx": 100.0, "original_rgb_size": [want.shape[1], want.shape[0]]}, "t:1")
  s = rgbd.load_sample(r, tmp_path, tmp_path, "nyuv2")
  assert s.image.shape[:2] == want.shape[:2] and np.abs(s.image.astype(int) - want).mean() < 3


def test_missing_image_and_escaping_paths_in_records(tmp_path):
  r = _write(tmp_path, BASE, None, DEPTH)
  with pytest.raises(rgbd.SampleError, match="not found") as e:
    rgbd.load_sample(r, tmp_path / "rgb", tmp_path / "depth", "nyuv2")
  assert e.value.reason == "unreadable_image"
  RGB.save(tmp_path / "rgb" / "a.png")
  (tmp_path / "outside.png").write_bytes((tmp_path / "depth" / "a.png").read_bytes())
  (tmp_path / "depth" / "link.png").symlink_to(tmp_path / "outside.png")  # a link out of the root
  for field, rel in [("image", "../depth/a.png"), ("depth_path", "../outside.png"), ("depth_path", "link.png"),
                     ("mask_valid_path", "/etc/hostname")]:
    r = rgbd.parse_record(dict(BASE, **{field: rel}), "t:1")
    with pytest.raises(rgbd.SampleError, match="escapes|absolute") as e:
      rgbd.load_sample(r, tmp_path / "rgb", tmp_path / "depth", "nyuv2")
    assert e.value.reason == "bad_record" and rel in str(e.value)


def test_all_nan_or_inf_depth_is_skipped(tmp_path):
  RGB.save(tmp_path / "a.png")
  raw = np.full((40, 60), np.nan, np.float32)
  raw[::2] = np.inf
  raw.tofile(tmp_path / "d.bin")
  r = rgbd.parse_record(dict(BASE, image="a.png", depth_path="d.bin", depth_format="binary_float32", depth_scale=1.0,
                             original_rgb_size=[60, 40]), "t:1")
  with pytest.raises(rgbd.SampleError, match="no valid depth") as e:
    rgbd.load_sample(r, tmp_path, tmp_path, "nyuv2")
  assert e.value.reason == "no_valid_depth"


def test_ibims_masks(tmp_path):
  r = _write(tmp_path, dict(BASE, mask_transp_path="t.png", mask_valid_path="v.png"), RGB, DEPTH)
  transp = np.full((40, 60), 255, np.uint8)
  transp[:10] = 0
  valid = np.full((40, 60), 255, np.uint8)
  valid[:, :5] = 0
  Image.fromarray(transp).save(tmp_path / "depth" / "t.png")
  Image.fromarray(valid).save(tmp_path / "depth" / "v.png")
  s = rgbd.load_sample(r, tmp_path / "rgb", tmp_path / "depth", "ibims")
  assert np.all(s.depth[:10] == 0) and np.all(s.depth[:, :5] == 0) and np.all(s.depth[10:, 5:] == 2.0)


def test_centre_crop_for_taskonomy(tmp_path):
  r = _write(tmp_path, dict(BASE, canonical_fx=2000.0), Image.fromarray(np.zeros((40, 60, 3), np.uint8)), DEPTH)
  s = rgbd.load_sample(r, tmp_path / "rgb", tmp_path / "depth", "taskonomy")
  assert s.size_before_crop == (1200, 800) and s.image.shape == (800, 1024, 3) and s.crop_offset == (88, 0)
