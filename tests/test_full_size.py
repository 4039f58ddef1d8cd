"""benchmarks/full_size.py: the random checkpoint in the official layout, streamed export shards, and
the whole tiny run (write, predict, evaluate, one training step with its checkpoint, export)."""

import json
import pathlib
import tracemalloc

import numpy as np
import pytest
import safetensors

from benchmarks import full_size
from depthvlm_jax import export
from depthvlm_jax.model import hf_checkpoint
from depthvlm_jax.model.depthvlm import depthvlm_dummy_inputs
from depthvlm_jax.model.layers import abstract_params
from flax import traverse_util
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this file out


def test_random_checkpoint_is_sharded_bf16_and_loads(tmp_path):
  out = tmp_path / "ckpt"
  full_size.write_checkpoint("tiny", out, max_shard_gb=8 / 1024)  # 8 MiB shards
  config, head = full_size.model_configs("tiny")
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert sorted(p.name for p in out.glob("*.safetensors")) == files  # no part files left behind
  total = 0
  for name in files:
    with safetensors.safe_open(str(out / name), framework="numpy") as f:
      for key in f.keys():
        assert index["weight_map"][key] == name
        t = f.get_tensor(key)
        assert t.dtype.name == "bfloat16", key
        total += t.nbytes
  assert index["metadata"]["total_size"] == total
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["torch_dtype"] == "bfloat16" and cfg["depth_head_type"] == "dpt"
  assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()
  model, params = hf_checkpoint.load_depthvlm(out)
  flat = traverse_util.flatten_dict(params)
  want = traverse_util.flatten_dict(abstract_params(model, **depthvlm_dummy_inputs(config)))
  assert set(flat) == set(want) and all(flat[k].shape == want[k].shape for k in want)
  embed = np.asarray(flat[("language_model", "embed_tokens")], np.float32)
  assert abs(embed.std() - 0.02) < 1e-3 and abs(embed.mean()) < 1e-3
  scales = [np.asarray(v) for k, v in flat.items() if k[-1] == "scale"]
  assert scales and all(np.all(s == 1) for s in scales)


def test_export_holds_at_most_one_shard(tmp_path):
  """64 tensors of 1 MiB stream through `write_hf_tensors` with 4 MiB shards: host memory stays near a shard."""
  config, head = full_size.model_configs("tiny")

  def tensors():
    for i in range(64):
      yield f"model.language_model.layers.{i}.mlp.up_proj.weight", np.full((512, 512), i, np.float32)

  tracemalloc.start()
  try:
    export.write_hf_tensors(tensors(), config, head, tmp_path / "out", max_shard_bytes=4 * 2**20,
                            processing_files=False)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 12 * 2**20, peak / 2**20  # the whole set is 64 MiB
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) == 16
  name = index["weight_map"]["model.language_model.layers.63.mlp.up_proj.weight"]
  with safetensors.safe_open(str(tmp_path / "out" / name), framework="numpy") as f:
    assert np.all(f.get_tensor("model.language_model.layers.63.mlp.up_proj.weight") == 63)


@pytest.mark.skipif(not (SHARED_DATA / "scannetpp_examples").is_dir(), reason="needs ../shared/data")
def test_tiny_full_run(tmp_path):
  result = full_size.main(["--size=tiny", f"--dir={tmp_path / 'run'}", "--bucket=64x96", "--keep"])
  assert result["ok"], result
  assert [r["step"] for r in result["steps"]] == list(full_size.STEPS)
  assert all(r["exit"] == 0 and r["peak_rss_bytes"] > 0 and r["wall_s"] > 0 for r in result["steps"])
  run = tmp_path / "run"
  assert (run / "train" / "checkpoints" / "1").is_dir()
  assert json.loads((run / "evaluate" / "results.json").read_text())["datasets"]["scannetpp"]["dense"]["images"] == 4
  assert list((run / "predict").iterdir())
  # the export restored the trained checkpoint: its backbone is the random checkpoint's, bit for bit
  _, written = hf_checkpoint.load_depthvlm(run / "checkpoint")
  _, exported = hf_checkpoint.load_depthvlm(run / "export")
  a, b = traverse_util.flatten_dict(written), traverse_util.flatten_dict(exported)
  assert set(a) == set(b)
  for k in a:
    if k[0] != "depth_head":
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))
  assert result["export_bytes"] == result["checkpoint_bytes"]
