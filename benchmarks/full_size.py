"""A full-size run on the CPU: wall time and peak memory of every tool against the checkpoint size.

  python -m benchmarks.full_size --size 4b --dir /tmp/full_4b [--json OUT.json] [--keep]

Steps, each in its own process (peak resident memory from `os.wait4`'s `ru_maxrss`, wall time around it):
  write     a random DepthVLM checkpoint in the official Hugging Face layout: config.json (with the
            depth-head fields), bfloat16 safetensors shards with their index, tokenizer and
            preprocessor files. Tensors are drawn one at a time and each shard is written as soon
            as it is full (`export.write_hf_tensors`), so the model is never whole in memory.
  predict   `python -m depthvlm_jax.predict` (bfloat16) on one 1920x1440 ScanNet++ frame of
            ../shared/data with its focal length (canonical 1006x1342, processed 992x1344, HxW);
  evaluate  `python -m depthvlm_jax.evaluate` (bfloat16, one image per batch) on the four shared
            ScanNet++ frames;
  train     `main.py` stage 1 from that directory: one step at global batch 1 on the same frames,
            cropped to a small bucket (`--bucket`, default 256x320), float32 parameters and
            bfloat16 compute, the checkpoint of step 1 saved;
  export    `python -m depthvlm_jax.export` of that run's checkpoint (restored) to a bfloat16 HF
            directory.

Sizes (`--size`):
  tiny  the tiny test model and head (seconds; what the CI test runs);
  0.6b  the text decoder of Qwen3-0.6B (28 layers of width 1024, vocabulary 151936, tied
        embeddings), a vision tower of Qwen3-VL-4B's width with 4 blocks, the official DPT head;
  4b    Qwen3-VL-4B-Instruct with the official DPT head (DepthVLM-4B).
Needs `free` memory for the largest step; run the 4b size alone, e.g. under `nice -n 10`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any, Iterator

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FRAMES = ROOT.parent / "shared" / "data" / "scannetpp_examples"
SIZES = ("tiny", "0.6b", "4b")
STEPS = ("write", "predict", "evaluate", "train", "export")


def model_configs(size: str):
  """(Qwen3VLConfig, DepthHeadConfig) of a size."""
  from depthvlm_jax.model.config import Qwen3VLConfig, TextConfig, VisionConfig
  from depthvlm_jax.model.depthvlm import DepthHeadConfig
  if size == "tiny":
    return Qwen3VLConfig.tiny(), DepthHeadConfig.tiny()
  if size == "4b":
    return Qwen3VLConfig.qwen3_vl_4b(), DepthHeadConfig()
  if size == "0.6b":
    vision = VisionConfig(depth=4, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=1024,
                          deepstack_visual_indexes=(0, 1, 2))
    text = TextConfig(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128)
    return Qwen3VLConfig(vision=vision, text=text, tie_word_embeddings=True), DepthHeadConfig()
  raise ValueError(f"--size={size!r}: expected one of {SIZES}")


def random_tensors(config, head, seed: int = 0, std: float = 0.02) -> Iterator[tuple[str, np.ndarray]]:
  """(official key, torch-layout float32 array) for every parameter, drawn one at a time.

  Weights are normal(0, std), norm scales 1, biases 0. Shapes come from `jax.eval_shape`, so no
  parameter is ever allocated beyond the one being yielded.
  """
  from flax import traverse_util
  from depthvlm_jax.model import hf_params
  from depthvlm_jax.model.depthvlm import DepthVLM, depthvlm_dummy_inputs
  from depthvlm_jax.model.layers import abstract_params
  model = DepthVLM(config, head=head)
  shapes = traverse_util.flatten_dict(abstract_params(model, **depthvlm_dummy_inputs(config)))
  rng = np.random.default_rng(seed)
  for path, s in shapes.items():
    if path[-1] == "bias":
      value = np.zeros(s.shape, np.float32)
    elif path[-1] == "scale":
      value = np.ones(s.shape, np.float32)
    else:
      value = rng.standard_normal(s.shape, np.float32) * np.float32(std)
    (key, torch_layout), = hf_params.params_to_hf(traverse_util.unflatten_dict({path: value}), config)
    del value
    yield key, torch_layout


def write_checkpoint(size: str, out: pathlib.Path, max_shard_gb: float) -> None:
  from depthvlm_jax import export
  config, head = model_configs(size)
  export.write_hf_tensors(random_tensors(config, head), config, head, out, dtype="bfloat16",
                          max_shard_bytes=int(max_shard_gb * 2**30), overwrite=True)


TRAIN_CONFIG = '''"""Written by benchmarks/full_size.py: stage 1, one step at global batch 1 from a HF directory."""
from configs import stage1


def get_config():
  c = stage1.get_config("default").unlock()
  c.model.hf_dir = {hf_dir!r}
  c.model.size = {size!r}
  c.model.dpt_features, c.model.dpt_out_channels, c.model.dpt_head_features = {head}
  # float32 trainable parameters (the head), frozen towers in bfloat16 (`model.frozen_dtype`)
  c.model.param_dtype = "float32"
  c.model.frozen_dtype = "bfloat16"
  c.model.compute_dtype = "bfloat16"
  c.model.remat = True
  c.data.kind = "jsonl"
  c.data.train_files = {{"scannetpp": {train!r}}}
  c.data.buckets = ({bucket},)
  c.data.seq_len = {seq_len}  # the bucket's image tokens + 128 text tokens, rounded up to 64
  c.train.global_batch = 1
  c.train.total_steps = 1
  c.train.warmup_fraction = 0.0
  c.ckpt_every = 1
  c.log_every = 1
  c.eval_every = 0
  c.eval_qa = 0
  c.mesh.data = 1
  return c.lock()
'''


def run_step(name: str, cmd: list[str], log: pathlib.Path) -> dict[str, Any]:
  """Runs `cmd` from the repository root; its wall time, peak RSS and exit status."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
  t0 = time.monotonic()
  with log.open("w") as f:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
  wall = time.monotonic() - t0
  code = os.waitstatus_to_exitcode(status)
  row = {"step": name, "wall_s": round(wall, 1), "peak_rss_bytes": usage.ru_maxrss * 1024, "exit": code,
         "command": " ".join(cmd)}
  if code != 0:
    row["log_tail"] = log.read_text()[-3000:]
  return row


def weights_bytes(directory: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def main(argv=None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(prog="python -m benchmarks.full_size", description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="tiny", choices=SIZES)
  ap.add_argument("--dir", required=True, help="working folder (the checkpoint, runs, outputs and logs)")
  ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {','.join(STEPS)}")
  ap.add_argument("--bucket", default="256x320", help="training bucket HxW (multiples of 32)")
  ap.add_argument("--max_shard_gb", type=float, default=1.0, help="shard size of the written checkpoint and export")
  ap.add_argument("--json", default=None, help="also write the results here")
  ap.add_argument("--keep", action="store_true", help="keep the working folder's large files")
  ap.add_argument("--write_only", action="store_true", help=argparse.SUPPRESS)  # the write step's own process
  args = ap.parse_args(argv)
  work = pathlib.Path(args.dir).resolve()
  hf_dir = work / "checkpoint"
  if args.write_only:
    write_checkpoint(args.size, hf_dir, args.max_shard_gb)
    return {}
  steps = [s.strip() for s in args.steps.split(",") if s.strip()]
  unknown = set(steps) - set(STEPS)
  if unknown:
    ap.error(f"--steps: unknown {sorted(unknown)}; expected a subset of {STEPS}")
  bucket = tuple(int(v) for v in args.bucket.lower().split("x"))
  work.mkdir(parents=True, exist_ok=True)
  record = json.loads((FRAMES / "examples.jsonl").read_text().splitlines()[0])  # its focal length too
  frame, fx = FRAMES / "rgb" / record["image"], record["original_fx"]
  data = f"{FRAMES / 'examples.jsonl'}|{FRAMES / 'rgb'}|{FRAMES / 'depth'}|scannetpp"
  _, head = model_configs(args.size)
  (work / "train_config.py").write_text(TRAIN_CONFIG.format(
      hf_dir=str(hf_dir), size="tiny" if args.size == "tiny" else "4b", train=data, bucket=bucket,
      head=(head.features, tuple(head.out_channels), head.head_features),
      seq_len=-(-((bucket[0] // 32) * (bucket[1] // 32) + 128) // 64) * 64))
  py = sys.executable
  commands = {
      "write": [py, "-m", "benchmarks.full_size", f"--size={args.size}", f"--dir={work}",
                f"--max_shard_gb={args.max_shard_gb}", "--write_only"],
      "predict": [py, "-m", "depthvlm_jax.predict", f"--model={hf_dir}", f"--image={frame}", f"--fx={fx}",
                  f"--out={work / 'predict'}", "--dtype=bfloat16", "--max_new_tokens=1"],
      "evaluate": [py, "-m", "depthvlm_jax.evaluate", f"--model={hf_dir}", f"--data=scannetpp={data}",
                   f"--out={work / 'evaluate'}", "--dtype=bfloat16", "--mesh=data=1", "--per_device_batch=1",
                   "--workers=1"],
      "train": [py, "main.py", f"--config={work / 'train_config.py'}", f"--workdir={work / 'train'}"],
      "export": [py, "-m", "depthvlm_jax.export", f"--checkpoint={work / 'train'}", f"--out={work / 'export'}",
                 "--dtype=bfloat16", f"--max_shard_gb={args.max_shard_gb}"],
  }
  for stale in ("predict", "evaluate", "train", "export"):  # every step starts from scratch
    if stale in steps:
      shutil.rmtree(work / stale, ignore_errors=True)
  rows = []
  for name in steps:
    row = run_step(name, commands[name], work / f"{name}.log")
    rows.append(row)
    print(f"{name:9s} {row['wall_s']:8.1f} s  peak RSS {row['peak_rss_bytes'] / 2**30:6.2f} GiB  exit {row['exit']}",
          flush=True)
    if row["exit"] != 0:
      print(row["log_tail"], file=sys.stderr)
      break
  size = weights_bytes(hf_dir) if hf_dir.exists() else 0
  for row in rows:
    row["rss_over_checkpoint"] = round(row["peak_rss_bytes"] / size, 3) if size else None
  result = {"size": args.size, "checkpoint_bytes": size, "checkpoint_files": len(list(hf_dir.glob("*.safetensors"))),
            "steps": rows, "ok": all(r["exit"] == 0 for r in rows) and len(rows) == len(steps)}
  if (work / "export").exists():
    result["export_bytes"] = weights_bytes(work / "export")
  print(f"checkpoint: {size / 2**30:.2f} GiB bfloat16 in {result['checkpoint_files']} shard(s); peak RSS / checkpoint: "
        + ", ".join(f"{r['step']} {r['rss_over_checkpoint']}" for r in rows))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
  if not args.keep:
    for big in ("checkpoint", "export", "train"):
      shutil.rmtree(work / big, ignore_errors=True)
  return result


if __name__ == "__main__":
  sys.exit(0 if main().get("ok", True) else 1)
