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

Outputs in --out (a folder, or an object-store prefix such as gs://bucket/eval): `per_image.jsonl`
(one line per image, appended after every batch, or on an object store rewritten at most every 30 s;
a rerun with the same settings skips what is there, so an interrupted run resumes), `results.json`
(the summary below) and the printed table. Per image, dense and sparse metrics are computed on the
host from the predictor's depth map; datasets average their images, "average" averages the datasets.
Annotation files, images and depth maps may be on an object store too. Images without a valid point
are counted (`empty`): left out of the means (correct) or counted as δ1 = 0 (official). No single
record stops a run: a bad JSON line, a missing or broken file, a missing depth_scale (correct),
out-of-frame coordinates (correct) or any other fault of one record skips that record and is
counted per reason, with its file:line message (`skipped`, `skip_messages`, and the table).

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

import sys
from typing import Any, Sequence

from absl import flags
from etils import epath

from depthvlm_jax import cli

if __name__ == "__main__":
  cli.quiet_libraries(sys.argv[1:])  # environment settings, read when jax and transformers are imported

from depthvlm_jax.evaluation import protocol  # noqa: E402
from depthvlm_jax.evaluation.predictors import ModelPredictor, make_baseline
from depthvlm_jax.evaluation.runner import SUMMARY_FILE, EvalConfigError, datasets_from_conf, parse_dataset, run
from depthvlm_jax.processing.image_processor import PREPROCESSING

PROG = "python -m depthvlm_jax.evaluate"
# The command's own flags (not absl's global FLAGS): `main(argv)` runs in-process too, beside other CLIs.
FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "HF-layout DepthVLM/Qwen3-VL directory, hub id org/name[@revision], or a "
                    "training workdir", flag_values=FLAGS)
flags.DEFINE_string("baseline", None, "ground_truth | constant:METRES | constant:train_median:JSONL|IMG|DEPTH|KIND",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("data", None, "NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND] (repeat for more datasets)",
                          flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory (reused to resume)", flag_values=FLAGS)
flags.DEFINE_string("modes", "sparse,dense", "comma list of sparse,dense", flag_values=FLAGS)
flags.DEFINE_enum("protocol", None, protocol.PROTOCOLS, "official: the authors' evaluator (paper numbers); "
                  "correct: aligned conventions (default)", flag_values=FLAGS)
flags.DEFINE_enum("coords", None, protocol.PROTOCOLS, "former name of --protocol", flag_values=FLAGS)
flags.DEFINE_enum("preprocess", None, PREPROCESSING, "image preprocessing (default: the protocol's; official = "
                  "28-then-32 resize)", flag_values=FLAGS)
flags.DEFINE_multi_string("coord_frame", [], "NAME=rgb|depth (correct protocol)", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "images per model call (rounded up to the mesh's batch shards)",
                     flag_values=FLAGS)
flags.DEFINE_integer("per_device_batch", None, "images per device of the mesh's batch axes (sets the batch; "
                     "overrides --batch_size)", flag_values=FLAGS)
flags.DEFINE_integer("limit", None, "first N records of each file", flag_values=FLAGS)
flags.DEFINE_integer("workers", 4, "threads that read images", flag_values=FLAGS)
flags.DEFINE_string("mesh", "data=-1", "mesh axes, e.g. data=-1 or data=2,fsdp=4", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype", flag_values=FLAGS)
flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: the backbone's linear layers with int8 "
                  "weights (weight-only; activations and the depth head in --dtype)", flag_values=FLAGS)
flags.DEFINE_integer("verbosity", 0, "1: print the traceback of an error too, and library logs", flag_values=FLAGS)
flags.DEFINE_string("datasets_conf", None, "the authors' eval_datasets.conf (NAME_JSONL, NAME_IMAGE, NAME_DEPTH, "
                    "NAME_SAMPLES shell variables; read, not run)", flag_values=FLAGS)
flags.DEFINE_string("datasets", None, 'names in --datasets_conf, e.g. "NYUV2 ETH3D" (default: its EVAL_DATASETS)',
                    flag_values=FLAGS)
flags.DEFINE_string("root", ".", "directory that relative paths of --datasets_conf start from", flag_values=FLAGS)
flags.mark_flags_as_required(["out"], flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the evaluation for the command-line flags `argv` (default: sys.argv[1:]); returns the summary."""
  cli.parse_flags(FLAGS, argv, PROG, __doc__)
  with cli.user_errors(FLAGS.verbosity, extra=(EvalConfigError,)):
    return _evaluate(FLAGS)


def _evaluate(args) -> dict[str, Any]:
  if bool(args.model) == bool(args.baseline):
    raise EvalConfigError("give exactly one of --model or --baseline")
  for name in ("batch_size", "per_device_batch"):
    if getattr(args, name) is not None and getattr(args, name) <= 0:
      raise EvalConfigError(f"--{name}={getattr(args, name)}: expected a positive integer")
  if args.protocol and args.coords and args.protocol != args.coords:
    raise EvalConfigError(f"--coords {args.coords} contradicts --protocol {args.protocol} (--coords is its former "
                          "name)")
  protocol_name = args.protocol or args.coords or "correct"
  frames = {}
  for v in args.coord_frame:
    name, _, frame = v.partition("=")
    if frame not in protocol.FRAMES:
      raise EvalConfigError(f"--coord_frame {v!r}: expected NAME=rgb|depth")
    frames[name] = frame
  datasets = [parse_dataset(v, frames) for v in args.data or []]
  if args.datasets_conf:
    datasets += datasets_from_conf(args.datasets_conf, args.datasets, args.root, frames)
  elif args.datasets:
    raise EvalConfigError("--datasets names datasets of --datasets_conf, which is not given")
  if not datasets:
    raise EvalConfigError("give --data NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT (repeatable) or --datasets_conf FILE")
  unknown = set(frames) - {d.name for d in datasets}
  if unknown:
    raise EvalConfigError(f"--coord_frame names {sorted(unknown)} are not --data names")
  cli.check_output_dir(args.out, "--out")
  if args.model:
    import jax.numpy as jnp
    from depthvlm_jax import sharding
    from depthvlm_jax.evaluation.loading import load_model
    mesh = sharding.make_mesh({k: int(v) for k, v in (p.split("=") for p in args.mesh.split(","))})
    loaded = load_model(args.model, dtype=getattr(jnp, args.dtype), mesh=mesh, quantize=args.quantize)
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
  print(f"wrote {epath.Path(args.out) / SUMMARY_FILE}")
  for name, d in summary["datasets"].items():
    if d["images"] == 0:  # an empty row is no result: say so with a failing exit status
      why = ", ".join(f"{k} {v}" for k, v in d["skipped"].items()) or "the file has no records"
      raise EvalConfigError(f"--data {name}: no image could be scored ({why}); the skipped records are listed "
                            f"above and in {epath.Path(args.out) / SUMMARY_FILE}")
  return summary


if __name__ == "__main__":
  main()
