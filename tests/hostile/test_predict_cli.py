"""`predict` on a folder of hostile images: the good image is written, each bad one is reported on
one line naming it (unreadable, 1x1 and 31x17 pixels, a decompression bomb, over the size cap) and
the exit status is 1; flag values are checked before the model loads; outputs are written
atomically and the full-resolution writers equal the in-memory ones."""

import contextlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from depthvlm_jax import export, predict
from depthvlm_jax.evaluation import outputs
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM
from tests.evaluation.helpers import random_params
from tests.hostile.conftest import error_line

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this file out


def bomb_png(path, w=60000, h=60000):
  """A valid PNG header declaring w x h pixels, with almost no data (what a decompression bomb starts as)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                   chunk(b"IEND", b""))


def call(*argv):
  """predict.main in this process: (exit status, stderr)."""
  err = io.StringIO()
  code = 0
  with contextlib.redirect_stderr(err):
    try:
      predict.main([str(a) for a in argv])
    except SystemExit as e:
      code = e.code
  return code, err.getvalue()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  config = Qwen3VLConfig.tiny(tie_word_embeddings=True)
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  return export.write_hf_dir(random_params(model, seed=1), config, model.head, tmp_path_factory.mktemp("m") / "hf")


@pytest.fixture(scope="module")
def folder_run(hf_dir, tmp_path_factory):
  images = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(images / "a_good.png")
  Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(images / "one_pixel.png")
  Image.fromarray(np.zeros((17, 31, 3), np.uint8)).save(images / "thin.png")
  (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
  bomb_png(images / "bomb.png")
  Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(images / "big.jpg")  # over a 0.005 MP cap (a_good is under)
  out = tmp_path_factory.mktemp("out")
  code, err = call("--model", hf_dir, "--image", images, "--out", out, "--fx", 100, "--max_new_tokens", 2,
                   "--max_megapixels", 0.005)
  return images, out, code, err


def failure_line(err, name):
  lines = [line for line in err.splitlines() if line.startswith("error: ") and name in line]
  assert len(lines) == 1, err
  return lines[0]


def test_good_images_are_written_past_bad_ones(folder_run):
  images, out, code, err = folder_run
  assert code == 1 and "Traceback" not in err
  assert "5 of 6 images failed" in err
  rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  assert [r["name"] for r in rows] == ["a_good"]
  assert np.load(out / "a_good_depth.npy").shape == (50, 70)
  assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary files


def test_unreadable_image_is_reported(folder_run):
  images, _, _, err = folder_run
  assert "cannot read image" in failure_line(err, str(images / "corrupt.png"))


@pytest.mark.parametrize("name,size", [("one_pixel.png", "1x1"), ("thin.png", "31x17")])
def test_tiny_images_are_refused_not_upscaled(folder_run, name, size):
  images, out, _, err = folder_run
  line = failure_line(err, str(images / name))
  assert f"{size} pixels; expected at least 32 pixels on each side" in line
  assert not list(out.glob(name.split(".")[0] + "*"))


def test_decompression_bomb_is_refused_by_the_size_cap(folder_run):
  images, _, _, err = folder_run
  assert "60000x60000 = 3600.0 megapixels exceeds --max_megapixels" in failure_line(err, str(images / "bomb.png"))


def test_size_cap_is_configurable(folder_run):
  images, _, _, err = folder_run
  assert "exceeds --max_megapixels=0.005" in failure_line(err, str(images / "big.jpg"))


@pytest.mark.parametrize("flag,value", [("--fx", 0), ("--fx", -3), ("--fx", "nan"), ("--max_megapixels", 0),
                                        ("--min_side", 0)])
def test_bad_flag_values_are_refused_before_loading(tmp_path, flag, value):
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
  code, err = call("--model", tmp_path / "no_model", "--image", tmp_path / "x.png", "--out", tmp_path / "o",
                   flag, value)
  error_line(code, err, f"{flag}=")
  assert not (tmp_path / "o").exists()


def test_fx_zero_in_a_list_file_is_refused(tmp_path):
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
  (tmp_path / "list.txt").write_text("x.png 0\n")
  code, err = call("--model", tmp_path, "--image", tmp_path / "list.txt", "--out", tmp_path / "o")
  error_line(code, err, f"{tmp_path / 'list.txt'}:1: fx=0.0")


@pytest.mark.parametrize("config_text,needle", [("{broken", "invalid JSON"), ('{"model_type": 3}', "")])
def test_bad_model_directories_are_one_line(tmp_path, config_text, needle):
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "config.json").write_text(config_text)
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
  code, err = call("--model", tmp_path / "m", "--image", tmp_path / "x.png", "--out", tmp_path / "o")
  error_line(code, err, str(tmp_path / "m"), needle)


def test_out_that_is_a_file_is_one_line(hf_dir, tmp_path):
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
  (tmp_path / "o").write_text("a file")
  code, err = call("--model", hf_dir, "--image", tmp_path / "x.png", "--out", tmp_path / "o")
  error_line(code, err, f"--out={tmp_path / 'o'}")


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
  depth = np.full((40, 60), 2.0, np.float32)
  rgb = np.zeros((40, 60, 3), np.uint8)
  result = dict(depth=depth, text="t", fx=50.0, intrinsics=outputs.intrinsics(60, 40, 50.0), original_size=(40, 60),
                canonical_size=(40, 60), processed_size=(32, 64))
  def killed(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(outputs, "write_ply_from_depth", killed)
  with pytest.raises(KeyboardInterrupt):
    predict.write_outputs(tmp_path, "img", rgb, result)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["img_depth.npy", "img_depth.png", "img_vis.png"]


def test_chunked_writers_equal_the_in_memory_ones(tmp_path):
  rng = np.random.default_rng(0)
  h, w = 600, 70  # several row chunks
  depth = rng.uniform(0.5, 9, (h, w)).astype(np.float32)
  depth[rng.random((h, w)) < 0.1] = 0
  rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
  k = outputs.intrinsics(w, h, 80.0)
  n = outputs.write_ply_from_depth(tmp_path / "a.ply", depth, k, rgb)
  outputs.write_ply(tmp_path / "b.ply", *outputs.backproject(depth, k, rgb))
  assert n == np.count_nonzero(depth) and (tmp_path / "a.ply").read_bytes() == (tmp_path / "b.ply").read_bytes()
  outputs.save_side_by_side(tmp_path / "v.png", rgb, depth)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "v.png")), outputs.side_by_side(rgb, depth))


def test_int8_predict_is_close_to_float(folder_run, hf_dir, tmp_path):
  """--quantize=int8 (weight-only int8 backbone) writes the same outputs, with depth within 1% of the
  float run's on this tiny random model."""
  images, float_out, _, _ = folder_run
  out = tmp_path / "int8"
  code, err = call("--model", hf_dir, "--image", images / "a_good.png", "--out", out, "--fx", 100,
                   "--max_new_tokens", 2, "--quantize", "int8")
  assert code == 0, err
  got, want = np.load(out / "a_good_depth.npy"), np.load(float_out / "a_good_depth.npy")
  assert got.shape == want.shape == (50, 70) and np.isfinite(got).all()
  assert (np.abs(got - want) / want).max() < 1e-2
