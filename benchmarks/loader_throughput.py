"""Input pipeline throughput next to the train step's consumption rate (default stage-1/2 configs).

  python -m benchmarks.loader_throughput [--batches 30] [--steps 6] [--workers 0,2] [--array_record]
  python -m benchmarks.loader_throughput --paper_shapes [--workers 0,2] [--batches 8]

For each stage's `default` config (tiny model, synthetic RGB-D set, bucket 192x256, seq 128,
batch 8; stage 2 mixes caption/QA samples), measured in one process, one after the other:
  loader       samples/s of `pipeline.batched(make_dataset(...))` with 0 and 2 worker processes,
               after the first batch (worker start-up is reported separately);
  train step   examples/s of the jitted train step (`trainer` helpers, after compilation) on a
               batch from that loader;
  end to end   examples/s of the step fed by the 2-worker loader (the two share the CPU).
The loader is not the bottleneck when its rate exceeds the train step's. With `--array_record` it
also converts the synthetic set with `tfds_builder` and reports conversion time, size on disk and
the 0-worker loader rate reading the ArrayRecord files.
The synthetic set is smaller than the config's (`--synthetic_train`); the loader's per-sample cost
does not depend on the set's size.

`--paper_shapes` measures instead what one host of a paper run loads: frames at the original
resolutions of the five training-set cameras (Waymo 1920x1280, DDAD 1936x1216, nuScenes 1600x900,
Argoverse2 front-centre 1550x2048, ScanNet++ iPhone 1920x1440: JPEG RGB + 16-bit PNG depth, with
focal lengths that give the canonical sizes of the issue), focal-unified and resized into the
`paper_4b` buckets, batch 160 (2560 rows over 16 hosts), and compares the samples/s with what the
host must feed: 2560 images per `--step_s` (default 3.2 s, the AOT estimate of the `paper_4b`
stage-1 step on v5p 4x4x4) over 16 hosts = 50 images/s.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax
import numpy as np

from configs import stage1, stage2
from data_pipelines import pipeline
from depthvlm_jax import sharding
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.processing.tokenizer import load_tokenizer
from depthvlm_jax.runs import freeze, model_from_config
from depthvlm_jax.train import data as train_data
from depthvlm_jax.train import distributed, model_state, optim
from depthvlm_jax.train.step import initial_state, make_train_step


FRAMES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "scannetpp_examples"


def stage_config(stage: int, synthetic_train: int, synthetic_dir: str):
  c = (stage1 if stage == 1 else stage2).get_config("default").copy_and_resolve_references()
  c.unlock()
  c.model_init = ""  # random init: same speed as the stage-1 checkpoint
  c.data.synthetic_train, c.data.synthetic_test, c.data.synthetic_dir = synthetic_train, 4, synthetic_dir
  return c


def loader(config, model_config, tokenizer, workdir, num_workers: int, sources=None):
  specs = train_data.example_specs(config, model_config)
  if sources is None:
    sources, weights, _ = train_data.data_sources(config, workdir)
  else:
    weights = [None] * len(sources)
  ds = pipeline.make_dataset(sources, weights, specs, model_config, tokenizer, ImageProcessorConfig(),
                             seed=config.data.shuffle_seed)
  return iter(pipeline.batched(ds, config.train.global_batch, num_workers))


def time_loader(it, batches: int) -> tuple[float, float, dict]:
  """(start-up seconds to the first batch, samples/s over `batches` more, last batch)."""
  t0 = time.perf_counter()
  batch = next(it)
  startup = time.perf_counter() - t0
  t0 = time.perf_counter()
  n = 0
  for _ in range(batches):
    batch = next(it)
    n += len(batch["input_ids"])
  return startup, n / (time.perf_counter() - t0), batch


def train_step(config):
  """(jitted step, state, frozen, (mesh, data shard), model) for the config, built with the trainer's helpers."""
  model = model_from_config.build_model(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  like, mask = model_from_config.params_like(config, model, mesh)
  params = model_state.initial_params(config, model, like, jax.random.key(0))
  trainable, frozen = freeze.split_params(params, mask)
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(config.train.lr, 1000, 0.04),
                                   config.train.grad_clip, config.train.weight_decay)
  state = initial_state(trainable, jax.jit(optimizer.init)(trainable))
  depth_grid = train_data.example_specs(config, model.config)[0].token_grid(model.config.vision.image_token_pixels)
  fn = make_train_step(model, optimizer, depth_grid, config.train.micro_batches, config.train.depth_loss_weight,
                       with_lm=config.stage == 2, lm_positions=config.train.lm_positions)
  shard = distributed.data_shard(mesh, config.train.global_batch)
  return jax.jit(fn, donate_argnums=(0,)), state, frozen, (mesh, shard), model


def time_steps(step, state, frozen, mesh, batches, steps: int) -> tuple[float, float, object]:
  """(compile+first-step seconds, examples/s over `steps` steps, state); `batches` yields host batches."""
  t0 = time.perf_counter()
  state, m = step(state, frozen, train_data.to_global(next(batches), *mesh))
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  n = 0
  for _ in range(steps):
    batch = next(batches)
    n += len(batch["input_ids"])
    state, m = step(state, frozen, train_data.to_global(batch, *mesh))
  jax.block_until_ready(m)
  return first, n / (time.perf_counter() - t0), state


# camera: (original W, H, fx) whose canonical (fx 1000) size is the (W, H)
PAPER_CAMERAS = {"waymo": (1920, 1280, 2060.0), "ddad": (1936, 1216, 2180.0), "nuscenes": (1600, 900, 1266.0),
                 "argoverse": (1550, 2048, 1773.0), "scannetpp": (1920, 1440, 1431.0)}


def write_paper_frames(root: pathlib.Path, per_camera: int) -> pipeline.SourceSpec:
  """`per_camera` smooth random frames per camera of PAPER_CAMERAS: one jsonl source."""
  import json
  from PIL import Image
  rng = np.random.default_rng(0)
  root.mkdir(parents=True, exist_ok=True)
  lines = []
  for name, (w, h, fx) in PAPER_CAMERAS.items():
    for i in range(per_camera):
      # low-frequency content upsampled: JPEG sizes and decode times like photographs, not like noise
      small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
      Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(root / f"{name}{i}.jpg", quality=90)
      depth = rng.uniform(1, 60, (h // 16, w // 16)).astype(np.float32)
      depth = np.asarray(Image.fromarray(depth).resize((w, h), Image.Resampling.BILINEAR))
      Image.fromarray((depth * 256).astype(np.uint16)).save(root / f"{name}{i}_d.png")
      lines.append(json.dumps({"image": f"{name}{i}.jpg", "depth_path": f"{name}{i}_d.png", "depth_scale": 256,
                               "original_rgb_size": [w, h], "original_fx": fx, "canonical_fx": 1000.0}))
  (root / "frames.jsonl").write_text("\n".join(lines) + "\n")
  return pipeline.SourceSpec(str(root / "frames.jsonl"), str(root), str(root), "waymo", name="paper_shapes")


def paper_shapes(args, workdir: pathlib.Path) -> None:
  """Loader samples/s on paper-size frames into the paper_4b buckets, against one host's demand."""
  config = stage1.get_config("paper_4b")
  model_config = model_from_config.build_model(stage_config(1, 4, str(workdir / "unused"))).config  # tiny: same patching
  specs = train_data.example_specs(config, model_config)
  source = write_paper_frames(workdir / "paper_frames", args.per_camera)
  hosts, batch = 16, config.train.global_batch // 16
  need = config.train.global_batch / args.step_s / hosts
  ds = pipeline.make_dataset([source], [None], specs, model_config, load_tokenizer(None), ImageProcessorConfig(),
                             seed=0)
  print(f"\npaper_4b buckets {[s.name for s in specs]}; {len(PAPER_CAMERAS)} cameras x {args.per_camera} frames; "
        f"bucket shares {ds.fractions()}")
  print(f"one host must feed {config.train.global_batch} images / {args.step_s} s / {hosts} hosts = {need:.1f} "
        f"images/s (batch {batch} per host)")
  for w in [int(x) for x in args.workers.split(",")]:
    # small batches: the rate per sample is the same, and a worker fills a whole batch before it shows
    it = iter(pipeline.batched(ds, args.paper_batch, w))
    cpu0 = time.process_time()  # this process's threads; worker processes are not counted
    startup, rate, b = time_loader(it, args.batches)
    cpu = (time.process_time() - cpu0) / ((args.batches + 1) * args.paper_batch)
    mb = sum(v.nbytes for v in b.values()) / len(b["input_ids"]) / 2**20
    print(f"{w} workers: {rate:.1f} samples/s ({rate / need:.2f} of the demand; first batch after {startup:.1f} s; "
          f"{mb:.1f} MiB per example, bucket {b['depth'].shape[1]}x{b['depth'].shape[2]} last)")
    if w == 0:  # all the work in this process: its CPU time per sample is what the host's cores must supply
      print(f"  {cpu:.2f} CPU-seconds per sample: {need * cpu:.0f} cores busy to feed {need:.0f} images/s "
            f"(with that many loader workers; the rate above depends on how busy this machine is)")
    del it


def dir_size(path: pathlib.Path, pattern: str = "*") -> int:
  return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batches", type=int, default=30, help="timed loader batches")
  ap.add_argument("--steps", type=int, default=6, help="timed train steps")
  ap.add_argument("--workers", default="0,2")
  ap.add_argument("--stages", default="1,2")
  ap.add_argument("--synthetic_train", type=int, default=64)
  ap.add_argument("--array_record", action="store_true")
  ap.add_argument("--workdir", default="")
  ap.add_argument("--paper_shapes", action="store_true", help="paper-size frames into the paper_4b buckets")
  ap.add_argument("--per_camera", type=int, default=4, help="frames per camera (--paper_shapes)")
  ap.add_argument("--paper_batch", type=int, default=4, help="loader batch (--paper_shapes)")
  ap.add_argument("--step_s", type=float, default=3.2, help="paper_4b stage-1 step time (--paper_shapes)")
  args = ap.parse_args()
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="loader_bench_"))
  if args.paper_shapes:
    paper_shapes(args, workdir)
    return
  syn = workdir / "synthetic"
  workers = [int(w) for w in args.workers.split(",")]
  tokenizer = load_tokenizer(None)
  rows, notes = [], []
  for stage in [int(s) for s in args.stages.split(",")]:
    config = stage_config(stage, args.synthetic_train, str(syn))
    model = model_from_config.build_model(config)
    row = {"stage": stage, "batch": config.train.global_batch, "step": float("nan"), "e2e": float("nan"),
           "compile_s": float("nan"), "e2e_workers": 0}
    for w in workers:
      it = loader(config, model.config, tokenizer, workdir, w)
      startup, rate, _ = time_loader(it, args.batches)
      row[f"loader_{w}w"], row[f"startup_{w}w"] = rate, startup
      del it
    if args.steps > 0:  # --steps 0: loader figures only
      step, state, frozen, mesh, model = train_step(config)
      compile_s, row["step"], state = time_steps(step, state, frozen, mesh,
                                                 loader(config, model.config, tokenizer, workdir, 0), args.steps)
      row["compile_s"] = compile_s
      row["e2e_workers"] = max(workers)
      it = loader(config, model.config, tokenizer, workdir, row["e2e_workers"])
      next(it)  # worker start-up
      _, row["e2e"], state = time_steps(step, state, frozen, mesh, it, args.steps)
      del it, state
    rows.append(row)
    if args.array_record and stage == 1:
      from data_pipelines import array_record, tfds_builder
      t0 = time.perf_counter()
      out = tfds_builder.convert(workdir / "array_record", tfds_builder.synthetic_splits(syn))
      conv = time.perf_counter() - t0
      n_conv = sum(len(array_record.data_source(out, s)) for s in ("train", "test", "qa", "qa_test"))
      rates = {}
      for name, sources in (("jsonl", None), ("array_record", [pipeline.tfds_source(out, "train")])):
        it = loader(config, model.config, tokenizer, workdir, 0, sources)
        rates[name] = time_loader(it, args.batches)[1]
      raw = dir_size(syn, "*.png") + dir_size(syn, "*.jsonl")
      notes.append(f"ArrayRecord conversion of the synthetic set ({n_conv} examples, 4 splits): {conv:.1f} s "
                   f"({n_conv / conv:.1f} examples/s); {dir_size(out) / 2**20:.1f} MiB vs "
                   f"{raw / 2**20:.1f} MiB of PNG + jsonl")
      notes.append(f"stage-1 loader, 0 workers, synthetic: jsonl {rates['jsonl']:.1f} samples/s, ArrayRecord "
                   f"{rates['array_record']:.1f} samples/s")
      if FRAMES.exists():  # full-size real frames (1920x1440 JPEG): where conversion pays off
        frames = pipeline.SourceSpec(str(FRAMES / "examples.jsonl"), str(FRAMES / "rgb"), str(FRAMES / "depth"),
                                     "scannetpp")
        out = tfds_builder.convert(workdir / "array_record_scannetpp", {"train": [frames]})
        for name, sources in (("jsonl", [frames]), ("array_record", [pipeline.tfds_source(out, "train", "scannetpp")])):
          rates[name] = time_loader(loader(config, model.config, tokenizer, workdir, 0, sources), args.batches)[1]
        notes.append(f"stage-1 loader, 0 workers, ScanNet++ 1920x1440 frames: jsonl {rates['jsonl']:.1f} samples/s, "
                     f"ArrayRecord {rates['array_record']:.1f} samples/s")

  cols = [f"loader {w}w (samples/s)" for w in workers] + ["train step (ex/s)", "end to end (ex/s)", "bottleneck"]
  print(f"\nloader throughput vs train step, {jax.devices()[0].platform} x{jax.device_count()}, "
        f"buckets {[tuple(b) for b in config.data.buckets]}, seq {config.data.seq_len}")
  print("| stage | batch | " + " | ".join(cols) + " |")
  print("|" + "---|" * (len(cols) + 2))
  for r in rows:
    best = max(r[f"loader_{w}w"] for w in workers)
    bottleneck = "-" if np.isnan(r["step"]) else "loader" if best < r["step"] else "train step"
    cells = [f"{r[f'loader_{w}w']:.1f}" for w in workers] + [f"{r['step']:.2f}", f"{r['e2e']:.2f}", bottleneck]
    print(f"| {r['stage']} | {r['batch']} | " + " | ".join(cells) + " |")
  for r in rows:
    print(f"stage {r['stage']}: first batch after " + ", ".join(f"{r[f'startup_{w}w']:.1f} s ({w} workers)"
                                                                for w in workers)
          + f"; compile + first step {r['compile_s']:.1f} s; end to end with {r['e2e_workers']} workers")
  for n in notes:
    print(n)


if __name__ == "__main__":
  main()
