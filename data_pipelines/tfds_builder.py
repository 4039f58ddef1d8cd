"""TFDS builder: annotation files (or the synthetic set) -> ArrayRecord files of ready RGB-D examples.

Each split is written by `tensorflow-datasets` as ArrayRecord shards holding, per usable record, the
image and depth exactly as the pipeline uses them (`pipeline.load_canonical`: decoded, EXIF-rotated,
focal-unified to `canonical_fx`, centre-cropped, range-masked), so training reads one record per
sample instead of decoding and resizing full-resolution files. Records that cannot be used are
skipped at conversion, logged, and counted in the dataset's `metadata.json` (`skip_counts`).

When to use it: a large or remote corpus (ScanNet++, Waymo, ... with full-size images, thousands of
small files on a network file system), many epochs or many hosts reading the same data, or when the
loader is the bottleneck. Read it with `pipeline.tfds_source(directory, split)`; the converted
dataset is random access (`tfds.data_sources` / grain), so shuffling, mixing and exact resume work
as for JSON Lines. For small sets (the embedded synthetic default, evaluation sets) the JSON Lines
path is simpler and as fast.

TensorFlow is NOT needed: `tensorflow-datasets` writes and reads ArrayRecord without it (pixels are
stored as zlib-compressed tensors; `tfds.features.Image` would need TensorFlow to encode NumPy
arrays, and decodes slower).

  python -m data_pipelines.tfds_builder --synthetic_dir=/tmp/syn --out=/tmp/syn_ar
  python -m data_pipelines.tfds_builder --split=train:ann.jsonl|image_root|depth_root|scannetpp --out=DIR
"""

from __future__ import annotations

import collections
import logging
import pathlib
from typing import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import pipeline, rgbd
from data_pipelines.skips import SKIP_REASONS

VERSION = "1.1.0"


class DepthvlmRgbd(tfds.core.GeneratorBasedBuilder):
  """Converted DepthVLM examples. Splits are given at construction: {split: [SourceSpec, ...]}.

  Example features: image (H, W, 3) uint8; depth (H, W) float32 metres, 0 = invalid ((0, 0) when
  `has_depth` is False); prompt, solution, key ("file:line"), dataset (text); canonical_fx;
  canonical_hw (2,) int32, the image's (h, w), for bucketing without decoding the image;
  crop_offset (2,) int32 (x0, y0) and size_before_crop (2,) int32 (W, H) of the centre crop;
  pixel_coords (N, 2) float32 and sparse_depth (N,) float32 (sparse evaluation points, N may be 0).
  """

  VERSION = tfds.core.Version(VERSION)
  # Nothing is downloaded, so there is no checksums file to look up next to this module (TFDS's
  # lookup would also need the `importlib_resources` backport).
  code_path = None

  def __init__(self, *, splits: Mapping[str, Sequence[pipeline.SourceSpec]] | None = None, **kwargs):
    self._splits = dict(splits or {})
    self._skip_counts: dict[str, dict[str, int]] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="DepthVLM RGB-D / caption-QA examples, focal-unified.",
        features=tfds.features.FeaturesDict({
            # zlib-compressed raw pixels: about twice as fast to decode as PNG (lossless either way)
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
            "depth": tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding="zlib"),
            "has_depth": tfds.features.Scalar(dtype=np.bool_),
            # metres = code / depth_scale for a depth read from integer codes (PNG); 0 otherwise
            "depth_scale": tfds.features.Scalar(dtype=np.float32),
            "prompt": tfds.features.Text(),
            "solution": tfds.features.Text(),
            "key": tfds.features.Text(),
            "dataset": tfds.features.Text(),
            "canonical_fx": tfds.features.Scalar(dtype=np.float32),
            "canonical_hw": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "crop_offset": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "size_before_crop": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "pixel_coords": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
            "sparse_depth": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        }),
        metadata=tfds.core.MetadataDict(skip_counts=self._skip_counts),
        disable_shuffling=True,  # keep annotation order; the grain pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    if not self._splits:
      raise ValueError("DepthvlmRgbd: no splits given; pass splits={name: [SourceSpec, ...]} to convert")
    return {name: self._generate_examples(name, sources) for name, sources in self._splits.items()}

  def _generate_examples(self, split: str, sources: Sequence[pipeline.SourceSpec]):
    counts = self._skip_counts.setdefault(split, {})
    for source in sources:
      if source.format != "jsonl":
        raise ValueError(f"{source.jsonl}: only JSON Lines sources can be converted, got {source.format!r}")
      records, bad = pipeline.load_records(source)
      for b in bad:
        logging.warning("conversion skips %s: %s", b.reason, b.detail)
        counts[b.reason] = counts.get(b.reason, 0) + 1
      for record in records:
        try:
          example = _example(record, source)
        except rgbd.SampleError as e:
          reason = e.reason if e.reason in SKIP_REASONS else "other"
          logging.warning("conversion skips %s: %s", reason, e)
          counts[reason] = counts.get(reason, 0) + 1
          continue
        yield record.source, example


def _example(record: rgbd.RGBDRecord, source: pipeline.SourceSpec) -> dict:
  sample = pipeline.load_canonical(record, source)
  image, depth = sample.image, sample.depth
  coords = np.asarray(record.pixel_coords or np.zeros((0, 2)), np.float32).reshape(-1, 2)
  return {
      "image": image,
      "depth": depth if depth is not None else np.zeros((0, 0), np.float32),
      "has_depth": depth is not None,
      "depth_scale": np.float32((record.depth_scale or rgbd.OFFICIAL_DEPTH_SCALE)
                                if depth is not None and record.depth_format == "png" else 0.0),
      "prompt": record.prompt or "",
      "solution": record.solution or "",
      "key": record.source,
      "dataset": source.dataset,
      "canonical_fx": record.canonical_fx,
      "canonical_hw": np.asarray(image.shape[:2], np.int32),
      "crop_offset": np.asarray(sample.crop_offset, np.int32),
      "size_before_crop": np.asarray(sample.size_before_crop, np.int32),
      "pixel_coords": coords,
      "sparse_depth": np.asarray(record.depth or np.zeros((0,)), np.float32),
  }


def convert(out_dir: str | pathlib.Path, splits: Mapping[str, Sequence[pipeline.SourceSpec]]) -> pathlib.Path:
  """Writes the splits as ArrayRecord files; returns the dataset directory for `tfds_source`."""
  builder = DepthvlmRgbd(splits=splits, data_dir=str(out_dir), file_format="array_record")
  builder.download_and_prepare()
  counts = builder.info.metadata["skip_counts"]
  for split, c in counts.items():
    if c:
      logging.warning("split %s: skipped at conversion %s", split, c)
  return pathlib.Path(builder.data_dir)


def synthetic_splits(root: str | pathlib.Path) -> dict[str, list[pipeline.SourceSpec]]:
  """The splits of a synthetic set written by `synthetic.write_synthetic_dataset`."""
  root = str(root)
  spec = lambda name, depth: [pipeline.SourceSpec(f"{root}/{name}.jsonl", root, root if depth else "", "synthetic",
                                                  with_depth=depth)]
  return {"train": spec("train", True), "test": spec("test", True), "qa": spec("qa", False),
          "qa_test": spec("qa_test", False)}


def main(argv):
  del argv
  out = _FLAGS.out
  if _FLAGS.synthetic_dir:
    splits = synthetic_splits(_FLAGS.synthetic_dir)
  else:
    splits = collections.defaultdict(list)
    for item in _FLAGS.split:
      name, value = item.split(":", 1)
      jsonl, image_root, depth_root, *rest = value.split("|") + ["", ""]
      splits[name].append(pipeline.SourceSpec(jsonl, image_root, depth_root, rest[0] or "unknown",
                                              with_depth=bool(depth_root)))
  print(convert(out, splits))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("out", None, "output data_dir", required=True)
  flags.DEFINE_string("synthetic_dir", "", "convert this synthetic set (all four splits)")
  flags.DEFINE_multi_string("split", [], "NAME:ann.jsonl|image_root|depth_root|dataset (no depth_root = caption/QA)")
  _FLAGS = flags.FLAGS
  app.run(main)
