"""Training data a user got wrong: a decompression-bomb PNG is a skipped sample (named), any decoder
failure is too, and a source whose samples are all unusable stops the pipeline with a message
instead of looping forever (alone or mixed with a good source)."""

import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import pipeline, rgbd, synthetic
from data_pipelines.skips import GIVE_UP_AFTER, SourceExhaustedError, Skipped
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.processing.tokenizer import load_tokenizer
from tests.hostile.test_predict_cli import bomb_png

SPEC = pipeline.ExampleSpec((64, 96), 64, with_answer=False)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  root = tmp_path_factory.mktemp("good")
  files = synthetic.ensure_synthetic_dataset(root, 2, 1, seed=0)
  return root, files


def bad_source(root, good_files, image_name):
  """A jsonl whose every record (copies of a good one) points at `image_name`."""
  record = json.loads(good_files["train"].read_text().splitlines()[0])
  path = root / f"all_{image_name}.jsonl"
  path.write_text("".join(json.dumps(dict(record, image=f"rgb/{image_name}")) + "\n" for _ in range(5)))
  return pipeline.SourceSpec(str(path), str(root), str(root), "synthetic")


def test_bomb_png_is_a_skipped_sample_naming_the_file(good):
  root, files = good
  bomb_png(root / "rgb" / "bomb.png")
  with pytest.raises(rgbd.SampleError, match="bomb.png: cannot decode image .*decompression bomb") as e:
    rgbd.load_rgb(root / "rgb" / "bomb.png")
  assert e.value.reason == "unreadable_image"
  source = bad_source(root, files, "bomb.png")
  records, _ = pipeline.load_records(source)
  out = pipeline.PrepareExample(source, SPEC, Qwen3VLConfig.tiny(), None, ImageProcessorConfig())(records[0])
  assert isinstance(out, Skipped) and out.reason == "unreadable_image" and "bomb.png" in out.detail


def test_any_decoder_failure_is_a_skip(good, monkeypatch):
  root, files = good
  def broken_decoder(*args, **kwargs):
    raise SyntaxError("broken PNG file")  # PIL raises odd types for some damaged files
  monkeypatch.setattr(Image, "open", broken_decoder)
  with pytest.raises(rgbd.SampleError, match="SyntaxError: broken PNG file"):
    rgbd.load_rgb(root / "rgb" / "train_00000.png")  # an existing file: it is opened, then decoding fails


def test_all_bad_source_stops_instead_of_looping(good):
  root, files = good
  source = bad_source(root, files, "missing.png")
  ds = pipeline.make_dataset([source], [1.0], SPEC, Qwen3VLConfig.tiny(), None, ImageProcessorConfig(), seed=0)
  with pytest.raises(SourceExhaustedError, match=f"{source.jsonl}: the first {GIVE_UP_AFTER} samples") as e:
    next(iter(pipeline.batched(ds, 2)))
  assert "missing.png: image file not found" in str(e.value)


def test_all_bad_source_mixed_with_a_good_one_is_named(good):
  root, files = good
  bad = bad_source(root, files, "missing.png")
  ok = pipeline.SourceSpec(str(files["train"]), str(root), str(root), "synthetic")
  ds = pipeline.make_dataset([ok, bad], [1.0, 1.0], SPEC, Qwen3VLConfig.tiny(), load_tokenizer(None),
                             ImageProcessorConfig(), seed=0)
  it = iter(pipeline.batched(ds, 2, give_up_after=10))
  with pytest.raises(SourceExhaustedError, match=f"{bad.jsonl}: the first 10 samples"):
    for _ in range(50):
      batch = next(it)
      assert "_source" not in batch and batch["has_depth"].all()


@pytest.mark.slow
def test_a_good_source_with_some_bad_samples_keeps_going(good):
  root, files = good
  lines = files["train"].read_text().splitlines()
  mixed = root / "mixed.jsonl"
  mixed.write_text("\n".join(lines + [json.dumps(dict(json.loads(lines[0]), image="rgb/missing.png"))] * 3) + "\n")
  ds = pipeline.make_dataset([pipeline.SourceSpec(str(mixed), str(root), str(root), "synthetic")], [1.0], SPEC,
                             Qwen3VLConfig.tiny(), load_tokenizer(None), ImageProcessorConfig(), seed=0)
  it = iter(pipeline.batched(ds, 1, give_up_after=4))  # 3 bad records: never 4 in a row before a good one
  batches = [next(it) for _ in range(8)]  # 3 of 5 records bad, over several epochs: never stops
  assert sum(int(b["skip_counts"].sum()) for b in batches) > 3
