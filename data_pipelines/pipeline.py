"""grain input pipeline: annotation records -> canonical RGB-D -> tokenised chat examples -> batches.

  MapDataset.source(records) ─ shuffle ─ repeat ─ random_map(prepare: load, focal-unify, crop to the
  bucket, patchify, tokenise) ─┐
  (caption/QA source, same steps, no depth) ─────────────────────────────────────┴─ mix(weights)
  ─ to_iter_dataset ─ DropSkipped ─ batch ─ [mp_prefetch]

Every example has the static shapes of one bucket (`image_size`, `seq_len`), so a batch never
recompiles the train step. Unusable samples become `Skipped` markers, are dropped and counted
(`skip_counts`), never trained on. The iterator state (grain) is checkpointed with the train state.
A source is a JSON Lines annotation file, or (`tfds_source`) a split converted to ArrayRecord by
`data_pipelines.tfds_builder`, which stores examples already decoded and focal-unified.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import grain
import numpy as np
from absl import flags
from PIL import Image

from data_pipelines import rgbd
from data_pipelines.skips import GIVE_UP_AFTER, SOURCE_KEY, DropSkipped, Skipped
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.rope_index import get_rope_index
from depthvlm_jax.processing import chat
from depthvlm_jax.processing.image_processor import ImageProcessorConfig, normalize_and_patchify

@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One annotation file with its roots; `dataset` picks the depth range (SPEC §4).

  With `format="array_record"`, `jsonl` is instead a directory written by
  `data_pipelines.tfds_builder.convert` (examples already loaded and focal-unified) and `split` picks
  its split; the roots are then unused. See `tfds_source`.
  """

  jsonl: str
  image_root: str
  depth_root: str = ""
  dataset: str = "synthetic"
  with_depth: bool = True  # False: caption/QA records (image + prompt + solution)
  format: str = "jsonl"  # "jsonl" | "array_record"
  split: str = "train"  # array_record only


def tfds_source(directory: str, split: str, dataset: str = "synthetic", with_depth: bool = True) -> SourceSpec:
  """A source reading split `split` of a converted ArrayRecord dataset (see `tfds_builder`)."""
  return SourceSpec(str(directory), "", "", dataset, with_depth, format="array_record", split=split)


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Static shapes and text settings of the examples."""

  image_size: tuple[int, int]  # (H, W) pixels, multiples of 32
  seq_len: int
  with_answer: bool  # stage 2: supervise the assistant reply; stage 1: prompt only
  random_crop: bool = True

  def token_grid(self, merge_px: int = 32) -> tuple[int, int]:
    return self.image_size[0] // merge_px, self.image_size[1] // merge_px

  def batch_shapes(self, model_config: Qwen3VLConfig, batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{name: (shape, dtype)} of a batch of `batch` examples as `batched` delivers them (without
    `skip_counts`): what ahead-of-time compilation feeds the train step.

    input_ids/attention_mask/labels (B, L), position_ids (B, 3, L), pixel_values (B, P, patch_dim),
    image_grid_hw (B, 2), depth (B, H, W), has_depth (B,).
    """
    h, w = self.image_size
    v = model_config.vision
    patches = (h // v.patch_size) * (w // v.patch_size)
    seq = (batch, self.seq_len)
    return {"input_ids": (seq, np.int32), "attention_mask": (seq, np.int32), "labels": (seq, np.int32),
            "position_ids": ((batch, 3, self.seq_len), np.int32),
            "pixel_values": ((batch, patches, v.patch_dim), np.float32), "image_grid_hw": ((batch, 2), np.int32),
            "depth": ((batch, h, w), np.float32), "has_depth": ((batch,), np.bool_)}


def _crop(array: np.ndarray, size: tuple[int, int], rng: np.random.Generator | None) -> np.ndarray:
  h, w = size
  dy, dx = array.shape[0] - h, array.shape[1] - w
  y0 = int(rng.integers(0, dy + 1)) if rng is not None else dy // 2
  x0 = int(rng.integers(0, dx + 1)) if rng is not None else dx // 2
  return array[y0:y0 + h, x0:x0 + w]


def load_canonical(record: rgbd.RGBDRecord, source: SourceSpec) -> rgbd.CanonicalSample:
  """Reads one record as the pipeline uses it (raises `rgbd.SampleError`).

  RGB-D sources: focal-unified image and depth (SPEC §4). Caption/QA sources (`depth` None): the
  image focal-unified too when the record gives `canonical_size` or `original_fx` (same geometry
  as the depth data), else as stored.
  """
  if source.with_depth:
    return rgbd.load_sample(record, source.image_root, source.depth_root, source.dataset)
  image = rgbd.load_rgb(rgbd.resolve_path(source.image_root, record.image))
  if record.canonical_size is not None or record.original_fx is not None:
    return rgbd.unify_focal(image, None, record, source.dataset)
  return rgbd.CanonicalSample(image, None, (0, 0), (image.shape[1], image.shape[0]))


def _cover(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear upscale keeping the aspect ratio until (H, W) >= `size` (image-only samples)."""
  h, w = image.shape[:2]
  s = max(size[0] / h, size[1] / w)
  new_wh = (max(size[1], math.ceil(w * s)), max(size[0], math.ceil(h * s)))
  return np.asarray(Image.fromarray(image).resize(new_wh, Image.Resampling.BILINEAR))


class PrepareExample:
  """Record -> example dict (or `Skipped`). Picklable, for grain worker processes.

  A record is an `rgbd.RGBDRecord` (read from its files) or, for `format="array_record"` sources, a
  converted example dict with `image`, `depth`, `has_depth`, `prompt`, `solution`, `key`.
  """

  def __init__(self, source: SourceSpec, spec: ExampleSpec, model_config: Qwen3VLConfig, tokenizer,
               processor: ImageProcessorConfig, tag_source: bool = False):
    self.source, self.spec, self.model_config = source, spec, model_config
    self.tokenizer, self.processor = tokenizer, processor
    self.tag_source = tag_source  # examples and skips carry the source's name (for DropSkipped)

  def __call__(self, record: Any, rng: np.random.Generator | None = None):
    out = self._prepare(record, rng)
    if not self.tag_source:
      return out
    if isinstance(out, Skipped):
      return dataclasses.replace(out, source=self.source.jsonl)
    out[SOURCE_KEY] = self.source.jsonl
    return out

  def _prepare(self, record: Any, rng: np.random.Generator | None):
    if isinstance(record, Skipped):
      return record
    h, w = self.spec.image_size
    if isinstance(record, dict):  # converted example: already loaded and focal-unified
      image = record["image"]
      depth = record["depth"] if self.source.with_depth else None
      if self.source.with_depth and not record["has_depth"]:
        return Skipped("missing_depth", f"{record['key']}: converted example has no depth")
      record = rgbd.RGBDRecord(image=record["key"], prompt=record["prompt"] or None,
                               solution=record["solution"] or None)
    else:
      try:
        sample = load_canonical(record, self.source)
        image, depth = sample.image, sample.depth
      except rgbd.SampleError as e:
        return Skipped(e.reason if e.reason in _REASONS else "other", str(e))
      except Exception as e:  # any other failure to read a sample skips it too; it never stops training
        return Skipped("other", f"{record.image}: {type(e).__name__}: {e}")
    if depth is None and (image.shape[0] < h or image.shape[1] < w):
      image = _cover(image, (h, w))  # no depth to keep metric: upscaling is harmless
    if image.shape[0] < h or image.shape[1] < w:
      return Skipped("too_small", f"{record.image}: {image.shape[:2]} < bucket {(h, w)}")
    crop_rng = rng if self.spec.random_crop else None
    state = crop_rng.bit_generator.state if crop_rng is not None else None
    image = _crop(image, (h, w), crop_rng)
    if depth is not None:
      if crop_rng is not None:
        crop_rng.bit_generator.state = state  # same crop window for depth
      depth = _crop(depth, (h, w), crop_rng)
      if not np.any(depth > 0):
        return Skipped("no_valid_depth", f"{record.image}: no valid depth in the crop")
    pixel_values, grid_thw = normalize_and_patchify(image, self.processor)
    merge = self.model_config.vision.spatial_merge_size
    n_tokens = int(grid_thw[1] // merge * grid_thw[2] // merge)
    prompt = record.prompt or chat.DEFAULT_PROMPT
    answer = (record.solution or chat.DEFAULT_REPLY) if self.spec.with_answer else None
    enc = chat.encode_sample(self.tokenizer, prompt, [n_tokens], answer=answer)
    ids, labels = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["labels"], np.int32)
    if len(ids) > self.spec.seq_len:
      return Skipped("too_long", f"{record.image}: {len(ids)} tokens > seq_len {self.spec.seq_len}")
    pad = self.spec.seq_len - len(ids)
    mask = np.concatenate([np.ones(len(ids), np.int32), np.zeros(pad, np.int32)])
    ids = np.concatenate([ids, np.full(pad, self.tokenizer.pad_token_id, np.int32)])
    labels = np.concatenate([labels, np.full(pad, -100, np.int32)])
    positions, _ = get_rope_index(ids[None], mask[None], [grid_thw[1:]], self.model_config.image_token_id, merge)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions[:, 0],
                pixel_values=pixel_values.astype(np.float32), image_grid_hw=np.asarray(grid_thw[1:], np.int32),
                depth=(depth if depth is not None else np.zeros((h, w))).astype(np.float32),
                has_depth=np.asarray(depth is not None))


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


def make_dataset(sources: Sequence[SourceSpec], weights: Sequence[float], spec: ExampleSpec,
                 model_config: Qwen3VLConfig, tokenizer, processor: ImageProcessorConfig, seed: int,
                 num_epochs: int | None = None) -> grain.MapDataset:
  """Shuffled, repeated, weighted mix of prepared examples (MapDataset; random access)."""
  parts = []
  for source in sources:
    records, bad = load_records(source)
    items = bad + records if bad else records
    if not len(items):
      raise ValueError(f"{source.jsonl}: no records")
    prepare = PrepareExample(source, spec, model_config, tokenizer, processor, tag_source=True)
    ds = grain.MapDataset.source(items).shuffle(seed=seed).repeat(num_epochs)
    parts.append(ds.random_map(prepare, seed=seed))
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, weights=list(weights))


def batched(ds: grain.MapDataset, batch_size: int, num_workers: int = 0,
            give_up_after: int = GIVE_UP_AFTER) -> grain.IterDataset:
  """Drops/counts skipped samples, batches, and optionally loads in worker processes.

  A source whose first `give_up_after` samples were all skipped stops iteration with
  `SourceExhaustedError` (see `skips`).
  """
  it = DropSkipped(ds.to_iter_dataset(), give_up_after).batch(batch_size, drop_remainder=True)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside absl.app use their defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it
