"""Peak host memory of importing a ~1 GB Hugging Face checkpoint, relative to the weights' size.

  python benchmarks/import_memory.py [--gb 1.0]

Writes a random Qwen3-VL checkpoint (sharded safetensors) of about --gb GB to a temp dir, then in a
fresh process measures the resident-set growth while `load_qwen3_vl` streams it into JAX arrays.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import resource, sys, json, gc
import jax, jax.numpy as jnp
from depthvlm_jax.model.hf_checkpoint import load_qwen3_vl
jnp.zeros(1).block_until_ready()
gc.collect()
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
base = rss()
config, params = load_qwen3_vl(sys.argv[1])
jax.block_until_ready(params)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
n = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"base": base, "peak": peak, "after": rss(), "param_bytes": n}))
"""


def write_checkpoint(out: pathlib.Path, gb: float) -> None:
  from safetensors.numpy import save_file
  from depthvlm_jax.model import hf_params
  from depthvlm_jax.model.config import Qwen3VLConfig, TextConfig, VisionConfig
  from flax import traverse_util
  from depthvlm_jax.model.layers import abstract_params
  from depthvlm_jax.model.qwen3_vl import Qwen3VL, dummy_inputs
  layers = max(1, int(gb * 2**30 / 4 / (12 * 1024 * 1024)))
  config = Qwen3VLConfig(
      vision=VisionConfig(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=1024,
                          deepstack_visual_indexes=(0, 1), num_position_embeddings=256),
      text=TextConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=128))
  shapes = traverse_util.flatten_dict(abstract_params(Qwen3VL(config), **dummy_inputs(config)))
  rng = np.random.default_rng(0)
  shard, size, idx, weight_map = {}, 0, 0, {}
  items = list(hf_params.params_to_hf(traverse_util.unflatten_dict({p: np.zeros(s.shape, np.float32) for p, s in shapes.items()}), config))
  for key, arr in items:
    shard[key] = rng.standard_normal(arr.shape, np.float32)
    size += shard[key].nbytes
    if size > 200 * 2**20:
      name = f"model-{idx:05d}.safetensors"
      save_file(shard, str(out / name))
      weight_map.update({k: name for k in shard})
      shard, size, idx = {}, 0, idx + 1
  if shard:
    name = f"model-{idx:05d}.safetensors"
    save_file(shard, str(out / name))
    weight_map.update({k: name for k in shard})
  (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (out / "config.json").write_text(json.dumps(config.to_hf_dict()))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--gb", type=float, default=1.0)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as d:
    out = pathlib.Path(d)
    write_checkpoint(out, args.gb)
    disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    res = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True,
                                    check=True, env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout.strip().splitlines()[-1])
  growth = res["peak"] - res["base"]
  print(f"checkpoint on disk: {disk / 2**30:.2f} GiB; params loaded: {res['param_bytes'] / 2**30:.2f} GiB")
  print(f"peak RSS growth while loading: {growth / 2**30:.2f} GiB = {growth / res['param_bytes']:.2f}x the weights")


if __name__ == "__main__":
  main()
