"""grain input pipeline: annotation records -> canonical RGB-D -> tokenised chat examples -> batches.

  records of each source ─ split by bucket (the size index, `sizes`: no image opened) ─┐
  per (source, bucket): MapDataset.source ─ shuffle ─ repeat ─ random_map(prepare: load,
    focal-unify, resize into the bucket with the aspect kept, pad, patchify, tokenise)
  per bucket: mix(sources) ─ to_iter_dataset ─ DropSkipped ─ batch
  all buckets: IterDataset.mix(bucket weights) ─ [mp_prefetch]

Buckets (`ExampleSpec`, one per static (H, W) image size, multiples of 32) keep every batch at one
set of static shapes, so the train step compiles once per bucket. A sample goes to the bucket
nearest to it in log aspect ratio plus log pixel count (`choose_bucket`; the pixel count clamped to
the processor's [min_pixels, max_pixels]) and is resized into it with its aspect ratio kept
(`fit_to_bucket`): nothing is cropped and no sample is too small. The image is scaled by
s = min(H / h, W / w); its focal length becomes s * canonical_fx, so the depth target is divided by
s to stay the depth of the canonical camera (fx = canonical_fx) that every other sample is seen
with. The bottom/right remainder is padding: pixels grey, depth 0 (no supervision), and patch
slots beyond the image's own token grid are not real tokens (the vision tower does not attend to
them and the text holds no image token for them). Caption/QA samples (no depth) take the same path.

Mixing: every source has a weight (by default its record count, as when the authors concatenate the
sets); the source's records are split over the buckets by their canonical sizes, each bucket draws
whole batches with the summed weight of its share of every source, and inside a bucket the sources
mix by those shares, so each source keeps its weight overall. The bucket of a batch is decided
by a deterministic weighted interleave, not by the data, so every process of a multi-host run loads
the same bucket at the same step.

Depth targets go to the device as uint16 codes with a float32 unit per example
(`processing.depth_codes`): a PNG's own integer codes, exactly, or a fitted unit for float depth.

Several processes: each parses and sizes only its data shard of every source's records and gets the
others' sizes by an all-gather (`source_sizes`), so all build the same dataset; each then loads its
rows of every batch (`DataShard.select`). A JSON Lines source is held as line offsets and a record
is read and parsed when drawn, so worker processes do not hold the parsed annotation.

Unusable samples become `Skipped` markers, are dropped and counted per source and reason
(`skip_counts`, `drawn_counts`), never trained on. The iterator state (grain) is checkpointed with
the train state. A source is a JSON Lines annotation file, or (`tfds_source`) a split converted to
ArrayRecord by `data_pipelines.tfds_builder`, which stores examples already decoded and
focal-unified.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
from typing import Any, Callable, Sequence

import grain
import numpy as np
from absl import flags
from etils import epath
from PIL import Image

from data_pipelines import rgbd, sizes
from data_pipelines.skips import GIVE_UP_AFTER, SOURCE_KEY, DropSkipped, Skipped
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.rope_index import get_rope_index
from depthvlm_jax.processing import chat, depth_codes
from depthvlm_jax.processing.image_processor import ImageProcessorConfig

canonical_hw = sizes.canonical_hw

PAD_PIXEL = 128  # grey: about 0 after the processor's (x / 255 - 0.5) / 0.5


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One annotation file with its roots; `dataset` picks the depth range.

  With `format="array_record"`, `jsonl` is instead a directory written by
  `data_pipelines.tfds_builder.convert` (examples already loaded and focal-unified) and `split` picks
  its split; the roots are then unused. See `tfds_source`. `name` labels the source in skip counts
  and messages (default: `jsonl`, with `[split]` for an array_record source).
  """

  jsonl: str
  image_root: str
  depth_root: str = ""
  dataset: str = "synthetic"
  with_depth: bool = True  # False: caption/QA records (image + prompt + solution)
  format: str = "jsonl"  # "jsonl" | "array_record"
  split: str = "train"  # array_record only
  name: str = ""

  @property
  def label(self) -> str:
    return self.name or (self.jsonl if self.format == "jsonl" else f"{self.jsonl}[{self.split}]")


def tfds_source(directory: str, split: str, dataset: str = "synthetic", with_depth: bool = True) -> SourceSpec:
  """A source reading split `split` of a converted ArrayRecord dataset (see `tfds_builder`)."""
  return SourceSpec(str(directory), "", "", dataset, with_depth, format="array_record", split=split)


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Static shapes and text settings of the examples of one bucket."""

  image_size: tuple[int, int]  # (H, W) pixels, multiples of 32
  seq_len: int
  with_answer: bool  # stage 2: supervise the assistant reply; stage 1: prompt only

  @property
  def name(self) -> str:
    return f"{self.image_size[0]}x{self.image_size[1]}"

  def example_bytes(self) -> int:
    """Bytes of one example's arrays as `batched` delivers them (`batch_shapes`)."""
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.batch_shapes(None, 1).values())

  def token_grid(self, merge_px: int = 32) -> tuple[int, int]:
    return self.image_size[0] // merge_px, self.image_size[1] // merge_px

  def batch_shapes(self, model_config: Qwen3VLConfig | None, batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{name: (shape, dtype)} of a batch of `batch` examples as `batched` delivers them (without
    `skip_counts`, `drawn_counts`): what ahead-of-time compilation feeds the train step.

    input_ids/attention_mask/labels (B, L), position_ids (B, 3, L), pixels (B, H, W, 3) uint8 (the
    image at the top left of the bucket; patches are made on the device,
    `processing.device_patches`), image_grid_hw (B, 2) the image's patch grid, depth (B, H, W)
    uint16 codes and depth_unit (B,) float32 metres per code (`processing.depth_codes`, decoded
    inside the step), has_depth (B,).
    """
    h, w = self.image_size
    seq = (batch, self.seq_len)
    return {"input_ids": (seq, np.int32), "attention_mask": (seq, np.int32), "labels": (seq, np.int32),
            "position_ids": ((batch, 3, self.seq_len), np.int32),
            "pixels": ((batch, h, w, 3), np.uint8), "image_grid_hw": ((batch, 2), np.int32),
            "depth": ((batch, h, w), np.uint16), "depth_unit": ((batch,), np.float32),
            "has_depth": ((batch,), np.bool_)}


# ----------------------------------------------------------------------------- buckets
def bucket_distance(size_hw: tuple[int, int], bucket_hw: tuple[int, int], min_pixels: int = 0,
                    max_pixels: int = 2**62) -> float:
  """|log aspect ratio difference| + |log pixel count ratio| of an (h, w) image against a bucket; the
  image's pixel count is first clamped to [min_pixels, max_pixels] (the processor's budget)."""
  (h, w), (bh, bw) = size_hw, bucket_hw
  pixels = min(max(h * w, min_pixels), max_pixels)
  return abs(math.log((w / h) / (bw / bh))) + abs(math.log(pixels / (bh * bw)))


def choose_bucket(size_hw: tuple[int, int], buckets: Sequence[tuple[int, int]], min_pixels: int = 0,
                  max_pixels: int = 2**62) -> int:
  """Index of the bucket nearest to an (h, w) image (`bucket_distance`; the first one on a tie).

  Ties are real: an image below min_pixels and wider than two buckets of the same height is as far
  from both; distances are rounded so that float noise cannot break them differently.
  """
  d = [round(bucket_distance(size_hw, b, min_pixels, max_pixels), 9) for b in buckets]
  return int(np.argmin(d))


def fit_size(size_hw: tuple[int, int], bucket_hw: tuple[int, int]) -> tuple[float, tuple[int, int]]:
  """(scale, (h', w')): the largest aspect-keeping resize of an (h, w) image that fits the bucket."""
  (h, w), (bh, bw) = size_hw, bucket_hw
  s = min(bh / h, bw / w)
  return s, (min(bh, max(1, round(h * s))), min(bw, max(1, round(w * s))))


def fit_to_bucket(image: np.ndarray, depth: np.ndarray | None, bucket_hw: tuple[int, int],
                  merge_px: int = 32, nearest_rule: str = "centre"):
  """Resizes (aspect kept) and pads an image (and its depth) into a bucket.

  Args:
    image: (h, w, 3) uint8 canonical image; depth: (h, w) float32 metres (0 = invalid), uint16
      integer codes (`processing.depth_codes`), or None.
    bucket_hw: (H, W), multiples of `merge_px`.

  Returns:
    image (gh, gw, 3) uint8, the image's own grid: (h', w') resized pixels at the top left, grey
      padding up to the next multiples of `merge_px`;
    depth (H, W) (None without depth), 0 everywhere outside the resized map: float32 metres, the
      resized depth divided by the scale (the depth of the canonical camera, see the module
      docstring); or, for uint16 codes, the resized codes unchanged (the caller divides their
      unit by the scale);
    scale: the resize factor s (the focal length is now s * canonical_fx).
  """
  s, (rh, rw) = fit_size(image.shape[:2], bucket_hw)
  if (rh, rw) != image.shape[:2]:
    image = np.asarray(Image.fromarray(image).resize((rw, rh), Image.Resampling.BILINEAR))
  gh, gw = -(-rh // merge_px) * merge_px, -(-rw // merge_px) * merge_px
  canvas = np.full((gh, gw, 3), PAD_PIXEL, np.uint8)
  canvas[:rh, :rw] = image
  if depth is None:
    return canvas, None, s
  if depth.shape != (rh, rw):
    depth = rgbd.resize_nearest(depth, (rw, rh), nearest_rule)
  if depth.dtype == np.uint16:
    target = np.zeros(bucket_hw, np.uint16)
    target[:rh, :rw] = depth
    return canvas, target, s
  target = np.zeros(bucket_hw, np.float32)
  target[:rh, :rw] = depth / np.float32(s)
  return canvas, target, s


class InBucket:
  """Filter of the records sized lazily (`sizes.header_hw`, read when drawn): True for those whose
  nearest of `sizes_hw` is `sizes_hw[bucket]`; a record that cannot be sized belongs to the first
  (where it is skipped when prepared). Picklable, for grain worker processes."""

  def __init__(self, source: SourceSpec, sizes_hw: Sequence[tuple[int, int]], bucket: int,
               min_pixels: int, max_pixels: int):
    self.source, self.sizes_hw, self.bucket = source, tuple(sizes_hw), bucket
    self.min_pixels, self.max_pixels = min_pixels, max_pixels

  def __call__(self, record: Any) -> bool:
    hw = sizes.header_hw(record, self.source)
    b = choose_bucket(hw, self.sizes_hw, self.min_pixels, self.max_pixels) if hw else 0
    return b == self.bucket


LAZY_SAMPLE = 64  # records of a source sized at start-up to estimate where its unsized records go


def _lazy_shares(source: SourceSpec, records: Sequence[Any], lazy_rows: np.ndarray, bucket_hw, processor, seed: int,
                 shard: tuple[int, int] = (0, 1), gather: Callable[[np.ndarray], np.ndarray] | None = None):
  """Expected fraction of a source's lazily sized records per bucket, from the headers of a random
  sample of at most `LAZY_SAMPLE` of them (zeros when there are none). Only buckets that some
  sampled record goes to get a stream of them, so no such stream is without records; a record
  whose nearest bucket has none goes to the nearest bucket that has one (`InBucket`).

  The sample is the same for every data shard; each reads the headers of its own sampled records
  (i % count == index) and the counts are summed over the shards (`gather`)."""
  counts = np.zeros(len(bucket_hw))
  if not len(lazy_rows):
    return counts
  pick = np.random.default_rng(seed).choice(lazy_rows, min(LAZY_SAMPLE, len(lazy_rows)), replace=False)
  for i in pick:
    if i % shard[1] != shard[0]:
      continue
    hw = sizes.header_hw(records[int(i)], source)
    counts[choose_bucket(hw, bucket_hw, processor.min_pixels, processor.max_pixels) if hw else 0] += 1
  if shard[1] > 1:
    counts = np.asarray(gather(counts)).sum(0)
  return counts / counts.sum()


class _Parsed(collections.abc.Sequence):
  """The records of a `rgbd.AnnotationFile`, a bad line as a `Skipped` bad_record (picklable: the
  loader's worker processes read and parse each record when they draw it)."""

  def __init__(self, table: rgbd.AnnotationFile):
    self.table = table

  def __len__(self) -> int:
    return len(self.table)

  def __getitem__(self, i):
    try:
      return self.table[int(i)]
    except rgbd.RecordError as e:
      return Skipped("bad_record", str(e))


def _subset(records: Sequence[Any], indices: np.ndarray) -> Sequence[Any]:
  """records[indices]: a list for parsed records, a view for a converted split (read when drawn)."""
  return [records[i] for i in indices] if isinstance(records, list) else _Subset(records, indices)


class _Subset(collections.abc.Sequence):
  """A view of records[indices]."""

  def __init__(self, records: Sequence[Any], indices: np.ndarray):
    self.records, self.indices = records, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.records[int(self.indices[i])]

  def canonical_sizes(self) -> np.ndarray:
    """The sizes of the viewed examples (`sizes.compute_sizes`), read without decoding them."""
    return self.records.canonical_sizes()[self.indices]


def source_sizes(source: SourceSpec, cache_dir: str | None = None, shard: tuple[int, int] = (0, 1),
                 gather: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[Sequence[Any], np.ndarray]:
  """(records, (N, 2) sizes) of every record of a source, where this process parses and sizes only
  its data shard `shard` = (index, count): records i with i % count == index.

  JSON Lines: one pass over the file notes where each record's line is; the shard's lines are
  parsed (only when its sizes are not in `cache_dir`, `sizes.cached`), and the records come as a
  sequence that reads and parses each line when indexed (a bad line: a `Skipped` bad_record).
  The sizes of the other shards come from `gather`, which stacks an array of every data shard
  ((count, ...), e.g. `distributed.shard_gather` across processes), so every process gets the same
  sizes while parsing 1 / count of the file. Sizes as `sizes.compute_sizes`, (BAD, BAD) for a bad line.
  """
  index, count = shard
  if count > 1 and gather is None:
    raise ValueError(f"data shard {index} of {count}: pass gather, which stacks an array of every shard")
  if source.format == "array_record":
    records, _ = load_records(source)
    mine = np.arange(index, len(records), count)
    local = sizes.cached(source, cache_dir, len(mine), lambda: sizes.compute_sizes(source, _Subset(records, mine)),
                         shard)
  elif source.format == "jsonl":
    table, _ = rgbd.scan_jsonl(source.jsonl, shard, parse=False)
    records = _Parsed(table)
    mine = np.arange(index, len(records), count)
    local = sizes.cached(source, cache_dir, len(mine),
                         lambda: sizes.sizes_from_fields(source, rgbd.scan_jsonl(source.jsonl, shard)[1]), shard)
  else:
    raise ValueError(f"{source.jsonl}: unknown source format {source.format!r}; expected 'jsonl' or 'array_record'")
  if count == 1:
    return records, local
  rows = -(-len(records) // count)  # every shard sends as many rows
  padded = np.zeros((rows, 2), np.int32)
  padded[:len(local)] = local
  stacked = np.asarray(gather(padded)).reshape(count, rows, 2)  # shard k holds records k, k + count, ...
  return records, stacked.transpose(1, 0, 2).reshape(rows * count, 2)[:len(records)]


# ----------------------------------------------------------------------------- examples
def load_canonical(record: rgbd.RGBDRecord, source: SourceSpec) -> rgbd.CanonicalSample:
  """Reads one record as the pipeline uses it (raises `rgbd.SampleError`).

  RGB-D sources: focal-unified image and depth. Caption/QA sources (`depth` None): the
  image focal-unified too when the record gives `canonical_size` or `original_fx` (same geometry
  as the depth data), else as stored.
  """
  if source.with_depth:
    return rgbd.load_sample(record, source.image_root, source.depth_root, source.dataset)
  image = rgbd.load_rgb(rgbd.resolve_path(source.image_root, record.image))
  if record.canonical_size is not None or record.original_fx is not None:
    return rgbd.unify_focal(image, None, record, source.dataset)
  return rgbd.CanonicalSample(image, None, (0, 0), (image.shape[1], image.shape[0]))


class PrepareExample:
  """Record -> example dict (or `Skipped`). Picklable, for grain worker processes.

  A record is an `rgbd.RGBDRecord` (read from its files) or, for `format="array_record"` sources, a
  converted example dict with `image`, `depth`, `has_depth`, `prompt`, `solution`, `key` (and
  `depth_scale`, when converted with it: the depth is sent as the integer codes it was read from).
  `buckets`: one `ExampleSpec` (every sample goes there) or several (each sample goes to the
  nearest, `choose_bucket`).
  """

  def __init__(self, source: SourceSpec, buckets: ExampleSpec | Sequence[ExampleSpec], model_config: Qwen3VLConfig,
               tokenizer, processor: ImageProcessorConfig, tag_source: bool = False):
    self.source, self.model_config = source, model_config
    self.buckets = (buckets,) if isinstance(buckets, ExampleSpec) else tuple(buckets)
    self.tokenizer, self.processor = tokenizer, processor
    self.tag_source = tag_source  # examples and skips carry the source's label (for DropSkipped)

  def spec_for(self, size_hw: tuple[int, int]) -> ExampleSpec:
    if len(self.buckets) == 1:
      return self.buckets[0]
    sizes = [b.image_size for b in self.buckets]
    return self.buckets[choose_bucket(size_hw, sizes, self.processor.min_pixels, self.processor.max_pixels)]

  def __call__(self, record: Any, rng: np.random.Generator | None = None):
    out = self._prepare(record)
    if not self.tag_source:
      return out
    if isinstance(out, Skipped):
      return dataclasses.replace(out, source=self.source.label)
    out[SOURCE_KEY] = self.source.label
    return out

  def _prepare(self, record: Any):
    if isinstance(record, Skipped):
      return record
    depth_scale = None  # set for a depth map read from integer codes (`depth_codes.integer_codes`)
    if isinstance(record, dict):  # converted example: already loaded and focal-unified
      image = record["image"]
      depth = record["depth"] if self.source.with_depth else None
      if self.source.with_depth and not record["has_depth"]:
        return Skipped("missing_depth", f"{record['key']}: converted example has no depth")
      if depth is not None and float(record.get("depth_scale", 0)) > 0:  # converted before: no such feature
        depth_scale = float(record["depth_scale"])
      record = rgbd.RGBDRecord(image=record["key"], prompt=record["prompt"] or None,
                               solution=record["solution"] or None)
    else:
      try:
        sample = load_canonical(record, self.source)
        image, depth = sample.image, sample.depth
        if depth is not None and record.depth_format == "png":
          depth_scale = record.depth_scale or rgbd.OFFICIAL_DEPTH_SCALE
      except rgbd.SampleError as e:
        return Skipped(e.reason if e.reason in _REASONS else "other", str(e))
      except Exception as e:  # any other failure to read a sample skips it too; it never stops training
        return Skipped("other", f"{record.image}: {type(e).__name__}: {e}")
    spec = self.spec_for(image.shape[:2])
    h, w = spec.image_size
    codes = depth_codes.integer_codes(depth, depth_scale) if depth_scale is not None else None
    image, target, s = fit_to_bucket(image, depth if codes is None else codes, (h, w),
                                     self.model_config.vision.image_token_pixels)
    if target is not None and not np.any(target > 0):
      return Skipped("no_valid_depth", f"{record.image}: no valid depth after resizing into bucket {spec.name}")
    if target is None:
      codes, unit = np.zeros((h, w), np.uint16), np.float32(0)
    elif codes is not None:
      codes, unit = target, depth_codes.unit_for(depth_scale, s)
    else:
      codes, unit = depth_codes.fitted(target)
    patch, merge = self.model_config.vision.patch_size, self.model_config.vision.spatial_merge_size
    grid_thw = np.array([1, image.shape[0] // patch, image.shape[1] // patch])
    n_tokens = int(grid_thw[1] // merge * grid_thw[2] // merge)
    prompt = record.prompt or chat.DEFAULT_PROMPT
    answer = (record.solution or chat.DEFAULT_REPLY) if spec.with_answer else None
    enc = chat.encode_sample(self.tokenizer, prompt, [n_tokens], answer=answer)
    ids, labels = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["labels"], np.int32)
    if len(ids) > spec.seq_len:
      return Skipped("too_long", f"{record.image}: {len(ids)} tokens > seq_len {spec.seq_len}")
    pad = spec.seq_len - len(ids)
    mask = np.concatenate([np.ones(len(ids), np.int32), np.zeros(pad, np.int32)])
    ids = np.concatenate([ids, np.full(pad, self.tokenizer.pad_token_id, np.int32)])
    labels = np.concatenate([labels, np.full(pad, -100, np.int32)])
    positions, _ = get_rope_index(ids[None], mask[None], [grid_thw[1:]], self.model_config.image_token_id, merge)
    pixels = np.full((h, w, 3), PAD_PIXEL, np.uint8)  # the image's grid at the top left of the bucket
    pixels[:image.shape[0], :image.shape[1]] = image
    return dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions[:, 0],
                pixels=pixels, image_grid_hw=np.asarray(grid_thw[1:], np.int32),
                depth=codes, depth_unit=np.asarray(unit, np.float32), has_depth=np.asarray(depth is not None))


_REASONS = ("bad_record", "unreadable_image", "missing_depth", "corrupt_depth", "no_valid_depth")


def load_records(source: SourceSpec) -> tuple[Sequence[Any], list[Skipped]]:
  """Parses an annotation file; bad lines become `Skipped` (counted), never crash.

  For an `array_record` source: (its random-access data source of converted examples, []).
  """
  if source.format == "array_record":
    from data_pipelines import array_record  # optional dependency: tensorflow-datasets
    return array_record.data_source(source.jsonl, source.split), []
  if source.format != "jsonl":
    raise ValueError(f"{source.jsonl}: unknown source format {source.format!r}; expected 'jsonl' or 'array_record'")
  records, errors = rgbd.read_jsonl(source.jsonl)
  return records, [Skipped("bad_record", str(e)) for e in errors]


def count_records(source: SourceSpec) -> int:
  """Number of records (usable or not) of a source, its default mixing weight: the non-empty lines
  of a JSON Lines file (none is parsed), the examples of a converted split."""
  if source.format == "jsonl":
    with epath.Path(source.jsonl).open("rb") as f:
      return sum(1 for line in f if line.strip())
  records, bad = load_records(source)
  return len(records) + len(bad)


# ----------------------------------------------------------------------------- datasets and batches
@dataclasses.dataclass
class BucketedDataset:
  """Per-bucket random-access streams of prepared examples and the share of batches each gets.

  specs[i], datasets[i], weights[i]: bucket i (only buckets some record goes to); sources: the
  source labels (rows of the per-source skip counts); records: the record count of each source.
  """

  specs: list[ExampleSpec]
  datasets: list[grain.MapDataset]
  weights: list[float]
  sources: list[str]
  records: list[int]

  def map_datasets(self, fn: Callable[[grain.MapDataset], grain.MapDataset]) -> "BucketedDataset":
    """The same buckets with `fn` applied to each stream (e.g. a process's share, `DataShard.select`)."""
    return dataclasses.replace(self, datasets=[fn(d) for d in self.datasets])

  def fractions(self) -> dict[str, float]:
    """{bucket name: expected fraction of samples}."""
    total = sum(self.weights)
    return {s.name: w / total for s, w in zip(self.specs, self.weights)}


def make_dataset(sources: Sequence[SourceSpec], weights: Sequence[float | None],
                 buckets: ExampleSpec | Sequence[ExampleSpec], model_config: Qwen3VLConfig, tokenizer,
                 processor: ImageProcessorConfig, seed: int, num_epochs: int | None = None,
                 prepare: Callable[[SourceSpec, ExampleSpec], Callable] | None = None,
                 cache_dir: str | None = None, shard: tuple[int, int] = (0, 1),
                 gather: Callable[[np.ndarray], np.ndarray] | None = None) -> BucketedDataset:
  """Shuffled, repeated, weighted mix of prepared examples, split by bucket (module docstring).

  weights: one per source; None = the source's record count.
  prepare: (source, bucket) -> the record-to-example map of that source's records in that bucket;
    default `PrepareExample` (tagged with the source's label).
  cache_dir: where the size index of every source is kept (`sizes.cached`); None = not kept.
  shard, gather: this process parses and sizes only the records i % count == index of every source
    (`source_sizes`), and gets the other shards' sizes from `gather`. The dataset is the same
    whatever the shards: every process gets the same buckets, weights and streams, from which it
    loads its rows of every global batch (`BucketedDataset.map_datasets(DataShard.select)`).

  Records are bucketed by the sizes of the annotation (or a converted split's `canonical_hw`
  feature), without opening their images. Records whose size only the image tells are sized when
  drawn: every bucket that a start-up sample of them goes to (`_lazy_shares`) gets a stream of them
  all that keeps those nearest to it (`InBucket`), weighted by the sample's share.
  """
  if prepare is None:
    def prepare(source, spec):
      return PrepareExample(source, spec, model_config, tokenizer, processor, tag_source=True)
  buckets = [buckets] if isinstance(buckets, ExampleSpec) else list(buckets)
  bucket_hw = [b.image_size for b in buckets]
  cells: dict[int, list[tuple[grain.MapDataset, float]]] = {}
  counts = []
  for source, weight in zip(sources, weights):
    records, hw = source_sizes(source, cache_dir, shard, gather)
    n = len(records)
    if not n:
      raise ValueError(f"{source.jsonl}: no records")
    counts.append(n)
    weight = float(n if weight is None else weight)
    lazy = hw[:, 0] == sizes.UNKNOWN
    bad = np.flatnonzero(hw[:, 0] == sizes.BAD)
    assigned = np.zeros(len(records), np.int64)  # bucket 0 for records of no knowable size
    known = hw[:, 0] > 0
    if known.any():
      keys, inverse = np.unique(hw[known], axis=0, return_inverse=True)
      nearest = [choose_bucket((int(h), int(w)), bucket_hw, processor.min_pixels, processor.max_pixels)
                 for h, w in keys]
      assigned[known] = np.asarray(nearest)[inverse.reshape(-1)]
    lazy_rows = np.flatnonzero(lazy)
    lazy_share = _lazy_shares(source, records, lazy_rows, bucket_hw, processor, seed, shard, gather)
    targets = tuple(int(b) for b in np.flatnonzero(lazy_share))
    for b in range(len(buckets)):
      rows = np.flatnonzero(~lazy & (hw[:, 0] != sizes.BAD) & (assigned == b))
      items = _subset(records, np.concatenate([bad, rows]) if b == 0 else rows)  # bad lines first
      parts = []
      if len(items):
        parts.append((grain.MapDataset.source(items), len(items)))
      if lazy_share[b] > 0:
        in_bucket = InBucket(source, [bucket_hw[t] for t in targets], targets.index(b), processor.min_pixels,
                             processor.max_pixels)
        parts.append((grain.MapDataset.source(_subset(records, lazy_rows)).filter(in_bucket),
                      len(lazy_rows) * lazy_share[b]))
      for ds, expected in parts:
        ds = ds.shuffle(seed=seed).repeat(num_epochs).random_map(prepare(source, buckets[b]), seed=seed)
        cells.setdefault(b, []).append((ds, weight * expected / n))
  specs, datasets, bucket_weights = [], [], []
  for b in sorted(cells):
    parts = cells[b]
    specs.append(buckets[b])
    datasets.append(parts[0][0] if len(parts) == 1 else grain.MapDataset.mix([d for d, _ in parts],
                                                                            weights=[w for _, w in parts]))
    bucket_weights.append(sum(w for _, w in parts))
  return BucketedDataset(specs, datasets, bucket_weights, [s.label for s in sources], counts)


@dataclasses.dataclass(frozen=True)
class PrefetchPlan:
  """How far each bucket's stream reads ahead, and the host memory the loader's examples can take.

  Per loading process (each of `num_workers` workers, or the main process without workers): every
  bucket's stream holds at most `buffer` prepared examples (read ahead by `threads` threads), and
  one batch is assembled at a time (its examples and the stacked batch: 2 x batch_size examples of
  the largest bucket). With workers, each also has one finished batch queued for the main process,
  which holds the batch it hands out. `bound_bytes` sums these; it excludes what a process holds
  besides examples (the interpreter, the parsed annotation).
  """

  buffer: int
  threads: int
  bound_bytes: int


def prefetch_plan(specs: Sequence[ExampleSpec], batch_size: int, num_workers: int,
                  prefetch_bytes: int | None) -> PrefetchPlan:
  """The largest read-ahead (at most one batch per stream) whose `bound_bytes` fits `prefetch_bytes`
  (None: one batch per stream, unbounded). Raises ValueError when even one example per stream does not fit."""
  sizes = [s.example_bytes() for s in specs]
  procs = max(num_workers, 1)
  fixed = procs * 2 * batch_size * max(sizes) + (num_workers + 1) * batch_size * max(sizes) * (num_workers > 0)
  bound = lambda buffer: fixed + procs * buffer * sum(sizes)
  buffer = batch_size
  if prefetch_bytes is not None:
    buffer = min(batch_size, (prefetch_bytes - fixed) // (procs * sum(sizes)))
    if buffer < 1:
      raise ValueError(f"data.prefetch_bytes={prefetch_bytes}: the loader needs at least {bound(1)} bytes "
                       f"({procs} loading processes, local batch {batch_size}, {len(specs)} buckets of up to "
                       f"{max(sizes)} bytes per example); raise it or lower data.num_workers")
  return PrefetchPlan(int(buffer), int(min(16, buffer)), int(bound(buffer)))


def batched(ds: BucketedDataset, batch_size: int, num_workers: int = 0,
            give_up_after: int = GIVE_UP_AFTER, prefetch_bytes: int | None = None) -> grain.IterDataset:
  """Drops/counts skipped samples, batches each bucket, mixes the buckets' batches by their weights,
  and optionally loads in worker processes.

  Each batch holds one bucket's examples plus `skip_counts` (B, S, R) and `drawn_counts` (B, S) per
  source. A source whose first `give_up_after` samples in a bucket were all skipped stops iteration
  with `SourceExhaustedError` (see `skips`).

  Host memory: each bucket's stream reads ahead as far as `prefetch_plan` allows under
  `prefetch_bytes` (grain's read options; one finished batch queued per worker), so the examples
  the loader holds stay within `prefetch_plan(...).bound_bytes`.
  """
  plan = prefetch_plan(ds.specs, batch_size, num_workers, prefetch_bytes)
  read = grain.ReadOptions(num_threads=plan.threads, prefetch_buffer_size=plan.buffer)
  parts = [DropSkipped(d.to_iter_dataset(read), give_up_after, ds.sources).batch(batch_size, drop_remainder=True)
           for d in ds.datasets]
  it = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, weights=ds.weights)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside absl.app use their defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=1))
  return it
