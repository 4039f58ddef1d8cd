"""`python -m tests.train.two_process_data DATA_DIR PORT PROCESS_ID`: one of the two processes of
`test_two_process_data.py`.

Joins a 2-process JAX run (gloo on CPU), builds the training dataset of DATA_DIR/a.jsonl (sizes in
the annotation) and of DATA_DIR/b.jsonl (some records sized from their image headers) as the
trainer does (data shard `PROCESS_ID` of 2: this process parses and sizes only its half of the
records, the sizes of the other half come from the other process), draws `STEPS` local batches of
its rows from each and writes DATA_DIR/process_<id>.json: per annotation, the line numbers it
parsed while building the dataset, the bucket weights, and per step the bucket and the image names
of its rows.
"""

import json
import pathlib
import sys

STEPS = 12
LOCAL_BATCH = 2


class Which:
  """The record's image name and the bucket it was drawn in (in place of `PrepareExample`)."""

  def __init__(self, source, spec):
    self.label, self.bucket = source.label, spec.image_size

  def __call__(self, record, rng=None):
    import numpy as np
    from data_pipelines.skips import SOURCE_KEY
    return {SOURCE_KEY: self.label, "image": np.asarray(record.image), "h": np.int32(self.bucket[0])}


def specs():
  from data_pipelines import pipeline
  return [pipeline.ExampleSpec(hw, 64, with_answer=False) for hw in ((96, 128), (128, 96))]


def build(data_dir: pathlib.Path, name: str, shard, gather):
  from data_pipelines import pipeline
  from depthvlm_jax.model.config import Qwen3VLConfig
  from depthvlm_jax.processing.image_processor import ImageProcessorConfig
  source = pipeline.SourceSpec(str(data_dir / f"{name}.jsonl"), str(data_dir), str(data_dir), name=name)
  return pipeline.make_dataset([source], [None], specs(), Qwen3VLConfig.tiny(), None, ImageProcessorConfig(), seed=3,
                               prepare=Which, cache_dir=str(data_dir / f"cache_{name}_{shard[1]}"), shard=shard,
                               gather=gather)


def draw(ds, batch: int, steps: int):
  from data_pipelines import pipeline
  it = iter(pipeline.batched(ds, batch))
  out = []
  for _ in range(steps):
    b = next(it)
    out.append({"h": sorted({int(h) for h in b["h"]}), "images": [str(x) for x in b["image"]]})
  return out


def main(data_dir: str, port: str, process_id: str) -> None:
  from depthvlm_jax.train import distributed
  distributed.initialize(f"localhost:{port}", 2, int(process_id))
  import jax

  from data_pipelines import rgbd
  data_dir = pathlib.Path(data_dir)
  shard = distributed.DataShard(jax.process_index(), 2, LOCAL_BATCH)
  out = {}
  for name in ("a", "b"):
    parsed = []
    real = rgbd.parse_record
    rgbd.parse_record = lambda obj, where: parsed.append(where) or real(obj, where)
    ds = build(data_dir, name, shard.records(), lambda x: distributed.shard_gather(x, shard))
    rgbd.parse_record = real
    # (the loader threads of the first annotation's batches parse its records meanwhile: not counted)
    lines = [int(w.rsplit(":", 1)[1]) for w in parsed if w.rsplit(":", 1)[0].endswith(f"{name}.jsonl")]
    out[name] = {"parsed_lines": sorted(set(lines)), "weights": [float(w) for w in ds.weights],
                 "steps": draw(ds.map_datasets(shard.select), LOCAL_BATCH, STEPS)}
  (data_dir / f"process_{shard.index}.json").write_text(json.dumps(out))
  distributed.barrier("done")


if __name__ == "__main__":
  main(*sys.argv[1:])
