"""DepthVLM-Bench evaluation: per-dataset and average δ1 and the standard depth metrics.

  python -m depthvlm_jax.evaluate --model DIR_OR_CKPT \\
      --data scannetpp=/data/scannetpp/test.jsonl|/data/scannetpp/rgb|/data/scannetpp/depth \\
      --data nyuv2=/data/nyu/test.jsonl|/data/nyu|/data/nyu \\
      --modes sparse,dense --protocol correct --out /tmp/eval_run

  --data NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]   KIND (depth range, crop; default NAME) is one of
                                                   `data_pipelines.rgbd.DATASET_DEPTH_RANGES`
  --baseline constant:2 | constant:train_median:JSONL|IMAGE_ROOT|DEPTH_ROOT|KIND | ground_truth
                                                   instead of --model
  --protocol official|correct                      official: the authors' evaluator end to end (the
                                                   paper's numbers); correct: our aligned conventions
                                                   (default). `evaluation/protocol.py`, README table.
  --coord_frame NAME=rgb|depth                     frame of pixel_coords (correct protocol)
  --preprocess official|direct                     override the protocol's image preprocessing
  --coords official|correct                        former name of --protocol (kept as an alias)
  --datasets_conf FILE [--datasets "A B"] [--root DIR]
                                                   the authors' eval_datasets.conf (besides or instead
                                                   of --data): NAME_JSONL/_IMAGE/_DEPTH/_SAMPLES, paths
                                                   from --root; default names: its EVAL_DATASETS

Outputs in --out: `per_image.jsonl` (one line per image, appended after every batch; a rerun with the
same settings skips what is there, so an interrupted run resumes), `results.json` (the summary
below) and the printed table. Per image, dense and sparse metrics are computed on the host from the
predictor's depth map; datasets average their images, "average" averages the datasets. Images without
a valid point are counted (`empty`): left out of the means (correct) or counted as δ1 = 0 (official).
No single record stops a run: a bad JSON line, a missing or broken file, a missing depth_scale
(correct), out-of-frame coordinates (correct) or any other fault of one record skips that record and
is counted per reason, with its file:line message (`skipped`, `skip_messages`, and the table).

Model predictions are batched and jitted: images are grouped by processed size (one compiled program
per size and padded prompt length, from one jitted forward built once with explicit shardings; the
last batch padded by repetition and the padded rows dropped) and the batch is sharded over the mesh's
batch axes (`--mesh data=-1`; `--per_device_batch N` = N images per batch shard). Images are read one
batch at a time (never the whole set in memory). Single-process; multi-host would need
`jax.make_array_from_process_local_data`.

This module is the command line only: the loop is `evaluation/runner.py`, the predictors
`evaluation/predictors.py`, the summary and table `evaluation/report.py`.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any, Sequence

from depthvlm_jax.evaluation import protocol
from depthvlm_jax.evaluation.predictors import ModelPredictor, make_baseline
from depthvlm_jax.evaluation.runner import SUMMARY_FILE, EvalConfigError, datasets_from_conf, parse_dataset, run
from depthvlm_jax.processing.image_processor import PREPROCESSING


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  import argparse
  ap = argparse.ArgumentParser(prog="python -m depthvlm_jax.evaluate", description=__doc__.split("\n")[0])
  ap.add_argument("--model", help="HF-layout DepthVLM/Qwen3-VL directory or a training workdir")
  ap.add_argument("--baseline", help="ground_truth | constant:METRES | constant:train_median:JSONL|IMG|DEPTH|KIND")
  ap.add_argument("--data", action="append", default=[], help="NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]")
  ap.add_argument("--datasets_conf", default=None, help="the authors' eval_datasets.conf (NAME_JSONL, NAME_IMAGE, "
                  "NAME_DEPTH, NAME_SAMPLES shell variables; read, not run)")
  ap.add_argument("--datasets", default=None, help='names in --datasets_conf, e.g. "NYUV2 ETH3D" (default: '
                  "its EVAL_DATASETS)")
  ap.add_argument("--root", default=".", help="directory that relative paths of --datasets_conf start from")
  ap.add_argument("--out", required=True, help="output directory (reused to resume)")
  ap.add_argument("--modes", default="sparse,dense", help="comma list of sparse,dense")
  ap.add_argument("--protocol", default=None, choices=protocol.PROTOCOLS,
                  help="official: the authors' evaluator (paper numbers); correct: aligned conventions (default)")
  ap.add_argument("--coords", default=None, choices=protocol.PROTOCOLS, help="former name of --protocol")
  ap.add_argument("--preprocess", default=None, choices=PREPROCESSING,
                  help="image preprocessing (default: the protocol's; official = 28-then-32 resize)")
  ap.add_argument("--coord_frame", action="append", default=[], help="NAME=rgb|depth (correct protocol)")
  ap.add_argument("--batch_size", type=int, default=8, help="images per model call (rounded up to the mesh's "
                  "batch shards)")
  ap.add_argument("--per_device_batch", type=int, default=None,
                  help="images per device of the mesh's batch axes (sets the batch; overrides --batch_size)")
  ap.add_argument("--limit", type=int, default=None, help="first N records of each file")
  ap.add_argument("--workers", type=int, default=4)
  ap.add_argument("--mesh", default="data=-1", help="mesh axes, e.g. data=-1 or data=2,fsdp=4")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--verbosity", type=int, default=0, help="1: print the traceback of an error too")
  args = ap.parse_args(argv)
  if bool(args.model) == bool(args.baseline):
    ap.error("give exactly one of --model or --baseline")
  for name in ("batch_size", "per_device_batch"):
    if getattr(args, name) is not None and getattr(args, name) <= 0:
      ap.error(f"--{name}={getattr(args, name)}: expected a positive integer")
  if args.protocol and args.coords and args.protocol != args.coords:
    ap.error(f"--coords {args.coords} contradicts --protocol {args.protocol} (--coords is its former name)")
  protocol_name = args.protocol or args.coords or "correct"
  frames = {}
  for v in args.coord_frame:
    name, _, frame = v.partition("=")
    if frame not in protocol.FRAMES:
      ap.error(f"--coord_frame {v!r}: expected NAME=rgb|depth")
    frames[name] = frame
  datasets = [parse_dataset(v, frames) for v in args.data]
  if args.datasets_conf:
    datasets += datasets_from_conf(args.datasets_conf, args.datasets, args.root, frames)
  elif args.datasets:
    ap.error("--datasets names datasets of --datasets_conf, which is not given")
  if not datasets:
    ap.error("give --data NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT (repeatable) or --datasets_conf FILE")
  unknown = set(frames) - {d.name for d in datasets}
  if unknown:
    ap.error(f"--coord_frame names {sorted(unknown)} are not --data names")
  if args.model:
    import jax.numpy as jnp
    from depthvlm_jax import sharding
    from depthvlm_jax.evaluation.loading import load_model
    mesh = sharding.make_mesh({k: int(v) for k, v in (p.split("=") for p in args.mesh.split(","))})
    loaded = load_model(args.model, dtype=getattr(jnp, args.dtype), mesh=mesh)
    batch_size = args.batch_size if args.per_device_batch is None else \
        args.per_device_batch * sharding.batch_shards(mesh)
    predictor = ModelPredictor(loaded, batch_size, mesh)
    batch_size = predictor.batch_size  # images read per step: one model batch at a time
  else:
    predictor = make_baseline(args.baseline)
    batch_size = args.batch_size
  summary = run(predictor, datasets, args.out, tuple(m.strip() for m in args.modes.split(",") if m.strip()),
                protocol_name, batch_size, args.limit, args.workers, preprocessing=args.preprocess)
  print(summary["table"])
  print(f"wrote {pathlib.Path(args.out) / SUMMARY_FILE}")
  return summary


if __name__ == "__main__":
  from depthvlm_jax import cli
  with cli.user_errors(cli.verbosity_from_argv(sys.argv[1:]), extra=(EvalConfigError,)):
    main()
