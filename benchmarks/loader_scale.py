"""The input pipeline at paper scale: start-up on a million records, throughput, host memory and
the bytes each example sends to the device, at the 768x1024 bucket.

  python -m benchmarks.loader_scale --records=1000000 --json F [--workers 2] [--batch 8] [--batches 4]

An annotation of `--records` RGB-D records is written first (not timed): every record names one
of the real ScanNet++ frames in /work/shared/data/scannetpp_examples (1920x1440 JPEG, 256x192
16-bit depth) with a focal length that makes its canonical size 1024x768, and carries that size
(`canonical_size`), so all of them belong to the 768x1024 bucket of the paper's seven. Measured in
one run, with the `paper_4b` stage-1 settings (buckets, text budget, tokenizer):
  startup_s               annotation parse + size index + dataset + worker start-up, to the first
                          batch of `pipeline.batched(..., num_workers)`;
  samples_per_s           examples/s over `--batches` further batches (this host's cores);
  cpu_s_per_sample        the loading processes' CPU seconds per example: the workers one paper
                          host needs is needed_samples_per_s x cpu_s_per_sample;
  host_rss_gib            peak resident memory of the main process and its workers together
                          (sampled every 0.2 s); main_rss_gib, worker_rss_gib: the peaks of the
                          main process alone and of the largest child process (a loader worker);
  device_bytes_per_example
                          bytes of one example's arrays as sent to the device (`by_array`: uint8
                          pixels, uint16 depth codes and their float32 unit, tokens; `image_` and
                          `depth_bytes_per_example`), next to the float32-patch format the loader
                          sent before (`patch_format_bytes_per_example`, with today's depth);
  prefetch_bound_gib      `pipeline.prefetch_plan` bound of this run and of one paper host
                          (16 workers, local batch 2560 / 16 hosts, `data.prefetch_bytes`);
  needed_samples_per_s    what one host of v5p 4x4x4 (16 hosts) must deliver: 2560 images per
                          `--step_s` (the AOT report's stage-1 step estimate) / 16.

With `--index_shards=N` it only times `pipeline.source_sizes` (reading and sizing the annotation)
as one process of 1 and as data shard 0 of N, which parses 1 / N of the lines; the other shards'
sizes, which an all-gather brings in a real run, are stood in for by this shard's own.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import threading
import time

import numpy as np
import psutil

from configs import stage1
from data_pipelines import pipeline
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.processing.tokenizer import load_tokenizer
from depthvlm_jax.runs.model_from_config import build_model
from depthvlm_jax.train.data import example_specs

POOL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "scannetpp_examples"
BUCKET = (768, 1024)
HOSTS = 16  # v5p 4x4x4: 64 chips, 4 per host


def write_annotation(path: pathlib.Path, records: int) -> None:
  """`records` lines over the pool's frames, each focal-unified to canonical size 1024x768."""
  frames = [json.loads(l) for l in (POOL / "examples.jsonl").read_text().splitlines() if l.strip()]
  lines = []
  for f in frames:
    w, h = f["original_rgb_size"]
    fx = 1000.0 * w / BUCKET[1]
    lines.append(json.dumps({"image": f["image"], "depth_path": f["depth_path"], "depth_scale": f["depth_scale"],
                             "original_rgb_size": [w, h], "original_fx": fx, "canonical_fx": 1000.0,
                             "canonical_size": [BUCKET[1], round(h * 1000.0 / fx)]}) + "\n")
  with open(path, "w") as out:
    for i in range(0, records, len(lines)):
      out.writelines(lines[:min(len(lines), records - i)])


class PeakRss:
  """Peak of the summed RSS of this process and its children, sampled in a thread; also the peak
  RSS of the main process alone and of the largest child (a loader worker)."""

  def __init__(self, every_s: float = 0.2):
    self.peak, self.main_peak, self.child_peak, self.children = 0, 0, 0, 0
    self._stop, self._every = threading.Event(), every_s
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _sample(self) -> int:
    me = psutil.Process()
    main = me.memory_info().rss
    total, kids = main, 0
    for child in me.children(recursive=True):
      try:
        rss = child.memory_info().rss
      except psutil.NoSuchProcess:
        continue
      total += rss
      kids += 1
      self.child_peak = max(self.child_peak, rss)
    self.main_peak = max(self.main_peak, main)
    self.children = max(self.children, kids)
    return total

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._sample())
      time.sleep(self._every)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._sample())


def children_cpu_s() -> float:
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--records", type=int, default=1_000_000)
  ap.add_argument("--json", default="", help="write the figures here")
  ap.add_argument("--workers", type=int, default=2, help="loader worker processes")
  ap.add_argument("--batch", type=int, default=8, help="local batch of the measured run")
  ap.add_argument("--batches", type=int, default=4, help="batches timed after the first")
  ap.add_argument("--step_s", type=float, default=2.2, help="stage-1 paper_4b step on v5p 4x4x4 (AOT report)")
  ap.add_argument("--workdir", default="", help="where the annotation is written (default: a temporary directory)")
  ap.add_argument("--index_shards", type=int, default=0, help="only time sizing as shard 0 of this many")
  args = ap.parse_args()

  config = stage1.get_config("paper_4b")
  model_config = build_model(config).config
  specs = example_specs(config, model_config)
  spec = next(s for s in specs if s.image_size == BUCKET)
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="loader_scale_"))
  workdir.mkdir(parents=True, exist_ok=True)
  ann = workdir / f"annotation_{args.records}.jsonl"
  if not ann.exists():
    t = time.perf_counter()
    write_annotation(ann, args.records)
    print(f"wrote {ann} ({ann.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
  source = pipeline.SourceSpec(str(ann), str(POOL / "rgb"), str(POOL / "depth"), "scannetpp", name="scale")
  if args.index_shards:
    times = {}
    for count in (1, args.index_shards):
      t = time.perf_counter()
      pipeline.source_sizes(source, None, (0, count), lambda x, c=count: np.stack([x] * c))
      times[f"index_s_shard_0_of_{count}"] = round(time.perf_counter() - t, 2)
    print(json.dumps(times))
    return
  tokenizer, processor = load_tokenizer(None), ImageProcessorConfig()

  with PeakRss() as rss:
    t0 = time.perf_counter()
    ds = pipeline.make_dataset([source], [None], specs, model_config, tokenizer, processor, seed=0)
    t_dataset = time.perf_counter() - t0
    it = iter(pipeline.batched(ds, args.batch, args.workers, prefetch_bytes=config.data.prefetch_bytes))
    first = next(it)
    startup = time.perf_counter() - t0
    cpu0, t1 = children_cpu_s(), time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
    elapsed = time.perf_counter() - t1
    cpu = children_cpu_s() - cpu0
  assert first["pixels"].shape[1:3] == BUCKET and batch["pixels"].dtype == np.uint8

  shapes = spec.batch_shapes(model_config, 1)
  by_array = {k: int(np.prod(s)) * np.dtype(d).itemsize for k, (s, d) in shapes.items()}
  v = model_config.vision
  patch_rows = (BUCKET[0] // v.patch_size) * (BUCKET[1] // v.patch_size) * v.patch_dim * 4
  samples = args.batches * args.batch
  local = config.train.global_batch // HOSTS
  paper_plan = pipeline.prefetch_plan(specs, local, config.data.num_workers, config.data.prefetch_bytes)
  run_plan = pipeline.prefetch_plan(ds.specs, args.batch, args.workers, config.data.prefetch_bytes)
  need = config.train.global_batch / args.step_s / HOSTS
  out = {
      "records": args.records, "workers": args.workers, "batch": args.batch, "bucket": list(BUCKET),
      "startup_s": round(startup, 2), "dataset_s": round(t_dataset, 2),
      "samples_per_s": round(samples / elapsed, 2), "cpu_s_per_sample": round(cpu / samples, 3),
      "host_rss_gib": round(rss.peak / 2**30, 3), "main_rss_gib": round(rss.main_peak / 2**30, 3),
      "worker_rss_gib": round(rss.child_peak / 2**30, 3), "child_processes": rss.children,
      "device_bytes_per_example": sum(by_array.values()), "by_array": by_array,
      "image_bytes_per_example": by_array["pixels"],
      "depth_bytes_per_example": by_array["depth"] + by_array["depth_unit"],
      "patch_format_bytes_per_example": sum(by_array.values()) - by_array["pixels"] + patch_rows,
      "prefetch_bound_gib": round(run_plan.bound_bytes / 2**30, 3),
      "paper_host": {"workers": config.data.num_workers, "local_batch": local,
                     "prefetch_bytes": config.data.prefetch_bytes, "read_ahead": paper_plan.buffer,
                     "prefetch_bound_gib": round(paper_plan.bound_bytes / 2**30, 1)},
      "needed_samples_per_s": round(need, 1), "step_s": args.step_s,
      "workers_needed_per_host": round(need * cpu / samples, 1),
  }
  print(json.dumps(out, indent=1))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
  main()
