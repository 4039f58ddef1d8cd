"""The trainer's data: sources and weights from the config, buckets, and host batches to global arrays."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterator

import jax
import numpy as np
from etils import epath

from data_pipelines import pipeline, synthetic
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.train import distributed


def example_specs(config, model_config: Qwen3VLConfig, with_answer: bool | None = None) -> list[pipeline.ExampleSpec]:
  """The training buckets: each (H, W) of `data.buckets` with `data.seq_len` (0 = the bucket's image
  tokens + `data.text_tokens`). `with_answer` defaults to stage 2."""
  px = model_config.vision.image_token_pixels
  with_answer = config.stage == 2 if with_answer is None else with_answer
  return [pipeline.ExampleSpec((h, w), config.data.seq_len or (h // px) * (w // px) + config.data.text_tokens,
                               with_answer=with_answer) for h, w in config.data.buckets]


def synthetic_root(config, workdir: pathlib.Path) -> epath.Path:
  return epath.Path(config.data.synthetic_dir or epath.Path(workdir) / "synthetic_data")


def depth_source_names(config) -> list[str]:
  """Names of the RGB-D train sources: the `data.train_files` keys ("synthetic" for synthetic data)."""
  return ["synthetic"] if config.data.kind == "synthetic" else list(config.data.train_files)


def data_sources(config, workdir: pathlib.Path):
  """(train sources, weights, eval sources) from the config; writes the synthetic set if needed.

  Weights: `data.train_weights[name]`, by default the source's record count; the caption/QA
  sources together get `data.qa_weight` of all samples, split by their record counts.
  """
  if config.data.kind == "synthetic":
    root = synthetic_root(config, workdir)
    def ensure():
      return synthetic.ensure_synthetic_dataset(root, config.data.synthetic_train, config.data.synthetic_test,
                                                config.data.synthetic_seed)
    if distributed.is_main():  # one writer; the other processes find the complete set after the barrier
      ensure()
    distributed.barrier("synthetic_data")
    paths = ensure()
    train = [pipeline.SourceSpec(str(paths["train"]), str(root), str(root), "synthetic", name="synthetic")]
    evals = {"synthetic_test": pipeline.SourceSpec(str(paths["test"]), str(root), str(root), "synthetic")}
    qa = [pipeline.SourceSpec(str(paths["qa"]), str(root), "", "synthetic", with_depth=False, name="synthetic_qa")]
  else:
    def spec(name, value, with_depth=True):
      jsonl, image_root, depth_root, *rest = str(value).split("|") + ["", ""]
      return pipeline.SourceSpec(jsonl, image_root, depth_root, rest[0] or "unknown", with_depth, name=name)

    train = [spec(k, v) for k, v in config.data.train_files.items()]
    evals = {k: spec(k, v) for k, v in config.data.eval_files.items()}
    qa = [spec(k, v, with_depth=False) for k, v in config.data.qa_files.items()]
  given = dict(config.data.train_weights)
  weights = [float(given[s.name]) if s.name in given else float(pipeline.count_records(s)) for s in train]
  if config.data.qa_weight > 0 and qa:
    counts = [pipeline.count_records(s) for s in qa]
    share = sum(weights) * config.data.qa_weight / (1 - config.data.qa_weight)
    train = train + qa
    weights = weights + [share * c / sum(counts) for c in counts]
  return train, weights, evals


def batch_names(key: str) -> tuple[str | None, ...]:
  """Logical names of a global train-batch array's leading dims (position_ids is (3, B, L))."""
  return (None, "batch") if key == "position_ids" else ("batch",)


HOST_ONLY = ("skip_counts", "drawn_counts")  # per-batch loader counts, never sent to the devices


def to_global(batch: dict[str, np.ndarray], mesh, shard: distributed.DataShard) -> dict[str, jax.Array]:
  """This process's rows (local_batch, ...) -> global arrays (global_batch, ...) sharded over the mesh."""
  out = {}
  for k, v in batch.items():
    if k in HOST_ONLY:
      continue
    names = batch_names(k)
    if k == "position_ids":
      v = np.moveaxis(v, 0, 1)  # (B, 3, L) -> (3, B, L)
    out[k] = distributed.global_array(v, mesh, names, len(names) - 1, shard)
  return out


def micro_batches(batch: dict[str, np.ndarray], mesh, shard: distributed.DataShard, k: int) -> Iterator[dict[str, jax.Array]]:
  """The K global micro-batches of a batch, each transferred when the caller asks for the next.

  Micro-batch i is rows i, i + K, i + 2K, ... of this process's rows. The processes' rows are
  contiguous blocks of the global batch, each divisible by K, so micro-batch i of the global batch is
  its rows i, i + K, ... too, and every device keeps the rows it would hold of the whole batch.
  """
  if shard.local_batch % k:
    raise ValueError(f"train.micro_batches={k} does not divide the {shard.local_batch} rows this process "
                     f"loads of each batch: choose micro-batches that divide the rows per process")
  micro_shard = dataclasses.replace(shard, local_batch=shard.local_batch // k)
  for i in range(k):
    yield to_global({n: v[i::k] for n, v in batch.items() if n not in HOST_ONLY}, mesh, micro_shard)
