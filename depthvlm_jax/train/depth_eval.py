"""Held-out depth δ1 during training: streamed, sharded, padded, one compiled step per bucket.

  records ─ pad to whole global batches ─ this process's rows ─ prepare (grain threads, a few
  batches ahead) ─ local batch ─ global arrays over the mesh ─ `jit_delta1` ─ (B,) δ1, count

* Streamed: only the batches in flight are decoded; the split is never held in host RAM. Each
  process loads only the rows its devices hold (as in training).
* One program per bucket: the step (`evaluation.step.jit_delta1`) is built once per run, with explicit
  shardings, and reused for every evaluation and every source.
* Batch: `eval_per_device_batch` rows per device of the mesh's batch axes (not the training global
  batch), fewer when the set is smaller.
* Depth: the prepared examples' 16-bit codes are decoded to float32 metres on the host (the δ1
  step takes metres), the same values the train step decodes on the device.
* Padding: the records are padded to whole global batches with placeholder rows (`valid` False),
  as are records that cannot be prepared (counted as skipped); placeholders never score.
The best constant depth (a reference δ1 that needs no model) is accumulated on the first pass over a
source and kept.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import grain
import jax
import numpy as np

from data_pipelines import pipeline
from data_pipelines.skips import Skipped
from depthvlm_jax import sharding
from depthvlm_jax.evaluation import step as eval_step
from depthvlm_jax.evaluation.metrics import BestConstant
from depthvlm_jax.processing import depth_codes
from depthvlm_jax.train import distributed


def global_batch_size(mesh, per_device_batch: int, num_records: int) -> int:
  """Rows of one global eval batch: `per_device_batch` per batch shard, or fewer for a small set
  (the set's size rounded up to a multiple of the shards)."""
  shards = sharding.batch_shards(mesh)
  return shards * min(per_device_batch, max(1, math.ceil(num_records / shards)))


@dataclasses.dataclass
class EvalSet:
  """One held-out source, read in global batches of `global_batch` rows (see the module docstring)."""

  name: str
  source: pipeline.SourceSpec
  spec: pipeline.ExampleSpec
  prepare: pipeline.PrepareExample
  records: Any  # a sequence of records (jsonl) or a random-access source (array_record)
  bad_lines: int  # annotation lines that could not be parsed
  global_batch: int
  shard: distributed.DataShard
  threads: int = 4
  best_constant_state: np.ndarray | None = None  # summed over processes after the first pass

  @property
  def num_batches(self) -> int:
    return math.ceil(len(self.records) / self.global_batch)

  def _placeholder(self, real: bool) -> dict[str, np.ndarray]:
    h, w = self.spec.image_size
    out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in
           self.spec.batch_shapes(self.prepare.model_config, 1).items()}
    out = {k: v[0] for k, v in out.items() if k != "depth_unit"}
    out["depth"] = np.zeros((h, w), np.float32)
    patch = self.prepare.model_config.vision.patch_size
    out["image_grid_hw"] = np.asarray([h // patch, w // patch], np.int32)  # a well-formed (blank) image
    out["attention_mask"][:] = 1  # no fully masked row
    return dict(out, valid=np.asarray(False), real=np.asarray(real))

  def _example(self, index: int) -> dict[str, np.ndarray]:
    if index >= len(self.records):
      return self._placeholder(real=False)
    out = self.prepare(self.records[index])
    if isinstance(out, Skipped):
      return self._placeholder(real=True)
    depth = depth_codes.batch_depth(out)  # the train target's metres, decoded on the host
    out = {k: v for k, v in out.items() if k != "depth_unit"}
    return dict(out, depth=depth, valid=np.asarray(True), real=np.asarray(True))

  def local_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every global batch, in order: (local_batch, ...) arrays plus `valid`
    (a prepared record) and `real` (a record, not end padding)."""
    padded = self.num_batches * self.global_batch
    rows = grain.MapDataset.range(padded)[self.shard.index::self.shard.count].map(self._example)
    n = self.shard.local_batch
    read = grain.ReadOptions(num_threads=max(1, min(self.threads, n)), prefetch_buffer_size=n)
    return iter(rows.to_iter_dataset(read).batch(n))


def make_eval_set(name: str, source: pipeline.SourceSpec, spec: pipeline.ExampleSpec, model_config, tokenizer,
                  processor, mesh, per_device_batch: int, threads: int = 4) -> EvalSet:
  """An `EvalSet` of `source`, every record resized (aspect kept) into the bucket `spec`, batched for `mesh`."""
  records, bad = pipeline.load_records(source)
  spec = dataclasses.replace(spec, with_answer=False)
  global_batch = global_batch_size(mesh, per_device_batch, len(records))
  return EvalSet(name, source, spec, pipeline.PrepareExample(source, spec, model_config, tokenizer, processor),
                 records, len(bad), global_batch, distributed.data_shard(mesh, global_batch), threads)


def _global(local: dict[str, np.ndarray], mesh, shard: distributed.DataShard) -> dict[str, jax.Array]:
  """Local rows -> global arrays at exactly the step's input shardings."""
  out = {}
  for k in eval_step.DELTA1_INPUTS:
    v = local[k]
    axis = 0
    if k == "position_ids":
      v, axis = np.moveaxis(v, 0, 1), 1  # (B, 3, L) -> (3, B, L)
    shape = list(v.shape)
    shape[axis] *= shard.count
    out[k] = jax.make_array_from_process_local_data(eval_step.input_sharding(mesh, k), v, tuple(shape))
  return out


def evaluate_depth(step, params, eval_set: EvalSet, mesh) -> dict[str, Any]:
  """Mean per-image δ1 of the model on `eval_set`, the best constant depth and its δ1.

  step: `evaluation.step.jit_delta1(model, mesh, shardings of params)`, built once per run.
  Returns {"delta1", "images" (scored), "skipped" (records that could not be prepared, bad lines
  included), "best_constant_m", "best_constant_delta1"}; the same on every process.
  """
  first_pass = eval_set.best_constant_state is None
  constant = BestConstant()
  scores: list[np.ndarray] = []
  skipped = 0
  for local in eval_set.local_batches():
    valid = local["valid"].astype(bool)
    skipped += int(np.sum(local["real"].astype(bool) & ~valid))
    if first_pass:
      for depth in local["depth"][valid]:
        constant.add(depth)
    d1, count = step(params, _global(local, mesh, eval_set.shard))
    d1, count = np.asarray(d1, np.float64), np.asarray(count)
    scores.append(d1[count > 0])
  if first_pass:
    eval_set.best_constant_state = distributed.process_sum(constant.state())
  scores = np.concatenate(scores) if scores else np.zeros(0)
  has_depth = eval_set.best_constant_state[-1] > 0
  best_m, best_d1 = constant.best(eval_set.best_constant_state) if has_depth else (float("nan"), float("nan"))
  skipped = int(distributed.process_sum(np.asarray([skipped]))[0]) + eval_set.bad_lines
  return {"delta1": float(np.mean(scores)) if scores.size else float("nan"), "images": int(scores.size),
          "skipped": skipped, "best_constant_m": best_m, "best_constant_delta1": best_d1}
