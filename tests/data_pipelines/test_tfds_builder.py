"""TFDS ArrayRecord conversion: records -> ArrayRecord -> grain source give identical examples and batches."""

import json

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import grain  # noqa: E402

from data_pipelines import array_record, pipeline, tfds_builder  # noqa: E402
from depthvlm_jax.model.config import Qwen3VLConfig  # noqa: E402
from depthvlm_jax.processing.image_processor import ImageProcessorConfig  # noqa: E402


@pytest.fixture(scope="module")
def converted(synthetic_set, tmp_path_factory):
  root, _ = synthetic_set
  splits = tfds_builder.synthetic_splits(root)
  # an extra split with one good record, sparse points, and two bad ones (counted, not written)
  first = json.loads((root / "train.jsonl").read_text().splitlines()[0])
  lines = [dict(first, pixel_coords=[[3, 4], [10.5, 7]], depth=[1.25, 2.5]), dict(first, depth_path="depth/nope.png"),
           dict(first, original_fx="300")]
  (root / "mixed.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  splits["mixed"] = [pipeline.SourceSpec(str(root / "mixed.jsonl"), str(root), str(root), "synthetic")]
  out = tfds_builder.convert(tmp_path_factory.mktemp("ar"), splits)
  return root, splits, out


def test_round_trip_gives_identical_examples(converted):
  root, splits, out = converted
  for split, sources in splits.items():
    src = array_record.data_source(out, split)
    records, bad = pipeline.load_records(sources[0])
    good = []
    for r in records:
      try:
        good.append((r, pipeline.load_canonical(r, sources[0])))
      except Exception:  # noqa: BLE001  (bad records are not written)
        pass
    assert len(src) == len(good), split
    for i, (r, sample) in enumerate(good):
      ex = src[i]
      np.testing.assert_array_equal(ex["image"], sample.image)
      assert ex["has_depth"] == (sample.depth is not None)
      if sample.depth is not None:
        assert ex["depth"].dtype == np.float32
        np.testing.assert_array_equal(ex["depth"], sample.depth)
      assert (ex["prompt"], ex["solution"], ex["key"]) == (r.prompt or "", r.solution or "", r.source)
      assert tuple(ex["crop_offset"]) == sample.crop_offset and tuple(ex["size_before_crop"]) == sample.size_before_crop
      np.testing.assert_array_equal(ex["pixel_coords"], np.asarray(r.pixel_coords or [], np.float32).reshape(-1, 2))
      np.testing.assert_array_equal(ex["sparse_depth"], np.asarray(r.depth or [], np.float32))
  assert json.loads((out / "metadata.json").read_text())["skip_counts"]["mixed"] == {"bad_record": 1,
                                                                                     "missing_depth": 1}
  assert array_record.data_source(out, "mixed")[0]["pixel_coords"].shape == (2, 2)

  # the same files through grain's own ArrayRecord reader, decoded with the dataset's feature spec
  files = sorted(str(p) for p in out.glob("*-train.array_record-*"))
  raw = grain.sources.ArrayRecordDataSource(files)
  features = tfds.builder_from_directory(str(out)).info.features
  ex = features.deserialize_example_np(raw[1])
  np.testing.assert_array_equal(ex["depth"], array_record.data_source(out, "train")[1]["depth"])


def test_pipeline_from_array_record_equals_pipeline_from_jsonl(converted, tokenizer):
  """Same seed, same records: RGB-D + QA mixed batches are identical whichever storage they come from."""
  root, splits, out = converted
  tok, cfg, proc = tokenizer, Qwen3VLConfig.tiny(), ImageProcessorConfig()
  spec = pipeline.ExampleSpec((96, 128), 128, with_answer=True)

  def batches(sources):
    ds = pipeline.make_dataset(sources, [1.0, 1.0], spec, cfg, tok, proc, seed=2)
    it = iter(pipeline.batched(ds, 2))
    return [next(it) for _ in range(6)]

  from_jsonl = batches([splits["train"][0], splits["qa"][0]])
  from_ar = batches([pipeline.tfds_source(out, "train"), pipeline.tfds_source(out, "qa", with_depth=False)])
  for a, b in zip(from_jsonl, from_ar):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert any(b["has_depth"].any() for b in from_ar) and any((~b["has_depth"]).any() for b in from_ar)


def test_bad_converted_dataset_paths(converted, tmp_path):
  _, _, out = converted
  with pytest.raises(FileNotFoundError, match="no dataset_info.json"):
    array_record.data_source(tmp_path, "train")
  with pytest.raises(ValueError, match="no split 'nope'"):
    array_record.data_source(out, "nope")
