"""The size index: bucketing from the annotation alone, lazily sized records, the cache, and
ArrayRecord sources bucketed without decoding their images."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import pipeline, rgbd, sizes
from data_pipelines.skips import SOURCE_KEY
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.processing.image_processor import ImageProcessorConfig

LAND, PORT = (96, 128), (128, 96)  # bucket (H, W)


def _specs():
  return [pipeline.ExampleSpec(hw, 64, with_answer=False) for hw in (LAND, PORT)]


class _Which:
  """Stands in for `PrepareExample`: the record's image name and the bucket it was drawn in."""

  def __init__(self, source, spec):
    self.label, self.bucket = source.label, spec.image_size

  def __call__(self, record, rng=None):
    return {SOURCE_KEY: self.label, "image": np.asarray(record.image), "h": np.int32(self.bucket[0])}


def _count_header_reads(monkeypatch):
  opened = []
  real = sizes._header_size
  monkeypatch.setattr(sizes, "_header_size", lambda path: opened.append(path) or real(path))
  return opened


def test_records_sized_by_the_annotation_open_no_image(tmp_path, monkeypatch):
  lines = [{"image": f"a{i}.png", "canonical_size": [130, 95]} for i in range(30)]
  lines += [{"image": f"b{i}.png", "original_fx": 500.0, "canonical_fx": 1000.0, "original_rgb_size": [48, 64]}
            for i in range(20)]
  (tmp_path / "a.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  source = pipeline.SourceSpec(str(tmp_path / "a.jsonl"), str(tmp_path), str(tmp_path), name="a")
  opened = _count_header_reads(monkeypatch)  # the images do not even exist
  ds = pipeline.make_dataset([source], [None], _specs(), Qwen3VLConfig.tiny(), None, ImageProcessorConfig(),
                             seed=0, num_epochs=1, prepare=_Which)
  assert opened == []
  assert [s.image_size for s in ds.specs] == [LAND, PORT] and ds.weights == [30.0, 20.0]
  drawn = {}
  for b in pipeline.batched(ds, 1):
    drawn[str(b["image"][0])] = int(b["h"][0])
  assert drawn == {**{f"a{i}.png": 96 for i in range(30)}, **{f"b{i}.png": 128 for i in range(20)}}


def test_records_without_a_size_are_sized_when_drawn_and_none_is_dropped(tmp_path, monkeypatch):
  """Caption records with neither size nor intrinsics: `LAZY_SAMPLE` headers are read at start-up;
  drawing on, every record comes, always in the bucket nearest to its image."""
  want = {}
  for i in range(90):
    w, h = (140, 100) if i % 3 else (100, 140)
    Image.new("RGB", (w, h)).save(tmp_path / f"c{i}.png")
    want[f"c{i}.png"] = 96 if w > h else 128
  (tmp_path / "c.jsonl").write_text("".join(json.dumps({"image": n}) + "\n" for n in want))
  source = pipeline.SourceSpec(str(tmp_path / "c.jsonl"), str(tmp_path), "", with_depth=False, name="c")
  opened = _count_header_reads(monkeypatch)
  ds = pipeline.make_dataset([source], [None], _specs(), Qwen3VLConfig.tiny(), None, ImageProcessorConfig(),
                             seed=0, prepare=_Which)
  assert len(opened) == pipeline.LAZY_SAMPLE
  assert [s.image_size for s in ds.specs] == [LAND, PORT]
  it = iter(pipeline.batched(ds, 1))
  drawn = [next(it) for _ in range(600)]
  assert {(str(b["image"][0]), int(b["h"][0])) for b in drawn} == set(want.items())


def test_size_index_is_cached_by_the_annotation_file(tmp_path, monkeypatch):
  ann = tmp_path / "a.jsonl"
  ann.write_text("".join(json.dumps({"image": f"{i}.png", "canonical_size": [64 + i, 32]}) + "\n" for i in range(5)))
  source = pipeline.SourceSpec(str(ann), str(tmp_path), str(tmp_path))
  records, _ = pipeline.load_records(source)
  first = sizes.size_index(source, records, tmp_path / "cache")
  np.testing.assert_array_equal(first, [[32, 64 + i] for i in range(5)])
  assert len(list((tmp_path / "cache").glob("sizes-*.npy"))) == 1

  def refuse(*args):
    raise AssertionError("recomputed")
  real = sizes.compute_sizes
  monkeypatch.setattr(sizes, "compute_sizes", refuse)
  np.testing.assert_array_equal(sizes.size_index(source, records, tmp_path / "cache"), first)
  # an edited annotation (new size and mtime) is a new key
  ann.write_text(ann.read_text() + json.dumps({"image": "x.png", "canonical_size": [10, 20]}) + "\n")
  os.utime(ann, ns=(1, 1))
  monkeypatch.setattr(sizes, "compute_sizes", real)
  records, _ = pipeline.load_records(source)
  assert sizes.size_index(source, records, tmp_path / "cache")[-1].tolist() == [20, 10]
  assert len(list((tmp_path / "cache").glob("sizes-*.npy"))) == 2


def test_unknowable_sizes_go_to_the_first_bucket_and_are_skipped_there(tmp_path):
  """An RGB-D record with neither canonical_size nor original_fx: size (0, 0), bucket 0, where
  preparing it fails as a bad record (counted, never trained on)."""
  (tmp_path / "d.jsonl").write_text(json.dumps({"image": "x.png", "depth_path": "x_d.png"}) + "\n")
  source = pipeline.SourceSpec(str(tmp_path / "d.jsonl"), str(tmp_path), str(tmp_path))
  records, _ = pipeline.load_records(source)
  assert sizes.compute_sizes(source, records).tolist() == [[0, 0]]
  assert sizes.header_hw(records[0], source) is None


@pytest.fixture()
def count_image_decodes(monkeypatch):
  tensor_feature = pytest.importorskip("tensorflow_datasets.core.features.tensor_feature")
  shapes = []
  real = tensor_feature.Tensor.decode_example_np

  def counting(self, example):
    shapes.append(self.shape)
    return real(self, example)
  monkeypatch.setattr(tensor_feature.Tensor, "decode_example_np", counting)
  return lambda: sum(1 for s in shapes if len(s) >= 2 and s[1] is None)  # image (H, W, 3), depth (H, W)


def test_array_record_source_is_bucketed_without_decoding(synthetic_set, tmp_path, count_image_decodes):
  """A converted split is bucketed from its `canonical_hw` feature: no image or depth is decoded
  before the first example is drawn, and each example lands where its decoded image says."""
  from data_pipelines import array_record, tfds_builder
  root, _ = synthetic_set
  out = tfds_builder.convert(tmp_path / "ar", {"train": tfds_builder.synthetic_splits(root)["train"]})
  source = pipeline.tfds_source(out, "train")
  records = array_record.data_source(out, "train")
  n_read = count_image_decodes()
  buckets = [pipeline.ExampleSpec(hw, 64, with_answer=False) for hw in ((96, 128), (128, 160), (64, 64))]
  ds = pipeline.make_dataset([source], [None], buckets, Qwen3VLConfig.tiny(), None, ImageProcessorConfig(),
                             seed=0, num_epochs=1, prepare=lambda s, spec: lambda r, rng=None: {
                                 SOURCE_KEY: s.label, "key": np.asarray(r["key"]), "h": np.int32(spec.image_size[0]),
                                 "shape": np.asarray(r["image"].shape[:2])})
  assert count_image_decodes() == n_read, "bucketing decoded images"
  records[0]
  assert count_image_decodes() == n_read + 2  # reading one example decodes its image and depth
  proc = ImageProcessorConfig()
  n = 0
  for b in pipeline.batched(ds, 1):
    hw = tuple(int(v) for v in b["shape"][0])
    want = buckets[pipeline.choose_bucket(hw, [s.image_size for s in buckets], proc.min_pixels, proc.max_pixels)]
    assert int(b["h"][0]) == want.image_size[0]
    n += 1
  assert n == len(records)
  np.testing.assert_array_equal(records.canonical_sizes(), [records[i]["image"].shape[:2] for i in range(n)])


@pytest.mark.parametrize("dataset,with_depth", [("synthetic", True), ("taskonomy", True), ("synthetic", False)])
def test_sizes_from_the_scanned_fields_equal_the_records_sizes(tmp_path, dataset, with_depth):
  """One pass over the file gives, from the parsed fields alone, the sizes `compute_sizes` gives
  from the records (rounding, the 1024 crop, header-sized and unknowable records), and marks bad
  lines; the shard's fields are those of records i % count == index."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(200):
    kind = i % 5
    if kind == 0:
      lines.append(json.dumps({"image": f"{i}.png", "canonical_size": [int(rng.integers(50, 2000)), int(rng.integers(50, 2000))]}))
    elif kind == 1:
      lines.append(json.dumps({"image": f"{i}.png", "original_fx": float(rng.uniform(200, 3000)),
                               "canonical_fx": float(rng.choice([1000.0, 517.5])),
                               "original_rgb_size": [int(rng.integers(50, 4000)), int(rng.integers(50, 4000))]}))
    elif kind == 2:
      lines.append(json.dumps({"image": f"{i}.png", "original_fx": 700.0}))  # sized from its header
    elif kind == 3:
      lines.append(json.dumps({"image": f"{i}.png"}))  # nothing: header-sized only without depth
    else:
      lines.append("{not json" if i % 10 == 4 else json.dumps({"image": 3}))  # bad lines
  (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n\n")
  source = pipeline.SourceSpec(str(tmp_path / "a.jsonl"), str(tmp_path), str(tmp_path), dataset, with_depth)
  records, bad = pipeline.load_records(source)
  valid = [i for i in range(200) if i % 5 != 4]
  assert len(records) == len(valid) and len(bad) == 40
  want = np.full((200, 2), sizes.BAD, np.int32)
  want[valid] = sizes.compute_sizes(source, records)
  table, fields = rgbd.scan_jsonl(source.jsonl)
  np.testing.assert_array_equal(sizes.sizes_from_fields(source, fields), want)
  for shard in ((0, 3), (2, 3)):
    _, part = rgbd.scan_jsonl(source.jsonl, shard)
    np.testing.assert_array_equal(sizes.sizes_from_fields(source, part), want[shard[0]::shard[1]])
  assert len(table) == 200 and table[valid[-1]] == records[-1] and table[-2] == records[-1]
  with pytest.raises(rgbd.RecordError, match=r"a.jsonl:5: invalid JSON"):
    table[4]


def test_annotation_file_reads_each_record_where_it_is(tmp_path):
  """Indexing reads and parses one line (also after pickling, as a loader worker does); the
  training streams get a bad line as a skipped bad_record."""
  import pickle
  (tmp_path / "a.jsonl").write_text('{"image": "a.png"}\n\n  \n{"image": "b.png", "prompt": "é"}\r\n{"image": 1}\n')
  table, _ = rgbd.scan_jsonl(tmp_path / "a.jsonl", parse=False)
  assert len(table) == 3 and table.lines.tolist() == [1, 4, 5]
  again = pickle.loads(pickle.dumps(table))
  for t in (table, again):
    assert (t[0].image, t[1].image, t[1].prompt) == ("a.png", "b.png", "é")
    assert t[1].source == f"{tmp_path / 'a.jsonl'}:4"
  source = pipeline.SourceSpec(str(tmp_path / "a.jsonl"), str(tmp_path), str(tmp_path), with_depth=False)
  records, hw = pipeline.source_sizes(source)
  assert hw.tolist() == [[-1, -1], [-1, -1], [sizes.BAD, sizes.BAD]]
  skipped = records[2]
  assert skipped.reason == "bad_record" and "a.jsonl:5: field 'image' must be a string" in skipped.detail
  assert pipeline.count_records(source) == 3
