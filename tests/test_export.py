"""PyTorch interop: JAX -> export -> PyTorch gives the same logits and depth; PyTorch -> import -> JAX;
export -> import is bit-identical."""

import jax
import numpy as np
from flax import traverse_util
import pytest
import torch
import transformers

from depthvlm_jax import export
from depthvlm_jax.model import hf_checkpoint, hf_params
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, random_params
from depthvlm_jax.model.inputs import make_model_inputs
from depthvlm_jax.torch_export import DepthVLMForConditionalGeneration
from tests.model import hf_reference as ref


@pytest.fixture(scope="module")
def jax_model():
  config = Qwen3VLConfig.tiny()
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  params = jax.tree.map(lambda x: x * 5.0 if x.ndim == 2 else x, random_params(model, seed=3))  # livelier logits
  return config, model, params


def _inputs(config, seed=0):
  rng = np.random.default_rng(seed)
  grids = [(4, 6), (4, 6)]
  toks = [ref.build_prompt(rng, config, grids[:1]), ref.build_prompt(rng, config, grids[1:], (6, 2))]
  patches = [ref.random_image_patches(rng, g, config) for g in grids]
  batch = make_model_inputs(toks, config, patches, grids, padding_side="right")
  batch.pop("rope_deltas")
  return batch, patches, grids


def _compare(config, model, params, torch_model, tol=1e-4):
  batch, patches, grids = _inputs(config)
  out = jax.jit(lambda p, b: model.apply({"params": p}, **b, depth_grid=(2, 3)))(params, batch)
  logits, depths = torch_model.depth_forward(torch.tensor(batch["input_ids"], dtype=torch.long),
                                             torch.tensor(batch["attention_mask"]),
                                             torch.tensor(np.concatenate(patches)),
                                             torch.tensor([[1, h, w] for h, w in grids]))
  real = batch["attention_mask"].astype(bool)
  lj, lt = np.asarray(out.logits)[real], logits.numpy()[real]
  assert np.abs(lj - lt).max() / np.abs(lt).max() < tol
  for i, d in enumerate(depths):
    assert (np.abs(np.asarray(out.depth[i]) - d.numpy()) / d.numpy()).max() < tol


@pytest.mark.slow
def test_export_loads_in_pytorch_and_matches(tmp_path, jax_model):
  config, model, params = jax_model
  out = export.write_hf_dir(params, config, model.head, tmp_path / "hf", max_shard_bytes=2**20,
                            processing_files=False)
  assert (out / "model.safetensors.index.json").exists()
  torch_model = DepthVLMForConditionalGeneration.from_pretrained(out).eval()  # strict: every key
  _compare(config, model, params, torch_model)
  # the plain transformers class loads every backbone weight; only depth_head.* is unexpected
  plain, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and all(k.startswith("depth_head.") for k in info["unexpected_keys"])
  # export -> import is bit-identical
  model2, params2 = hf_checkpoint.load_depthvlm(out)
  assert model2.head == model.head and model2.config == config
  a, b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
  assert set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


@pytest.mark.slow
def test_pytorch_to_jax(tmp_path, jax_model):
  config, model, _ = jax_model
  hf_cfg = transformers.Qwen3VLConfig(**config.to_hf_dict())
  for k, v in model.head.to_hf_dict().items():
    setattr(hf_cfg, k, v)
  torch.manual_seed(0)
  torch_model = DepthVLMForConditionalGeneration(hf_cfg).eval()
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  torch_model.save_pretrained(tmp_path / "pt")
  model2, params2 = hf_checkpoint.load_depthvlm(tmp_path / "pt")
  _compare(config, model2, params2, torch_model)


def test_bf16_export(tmp_path, jax_model):
  config, model, params = jax_model
  out = export.write_hf_dir(params, config, model.head, tmp_path / "bf16", dtype="bfloat16",
                            processing_files=False)
  _, params2 = hf_checkpoint.load_depthvlm(out, dtype=np.float32)
  a, b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
  for k in a:
    np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-2, atol=1e-6)


@pytest.mark.slow
def test_export_cli_from_training_workdir(tmp_path):
  """`python -m depthvlm_jax.export --checkpoint WORKDIR` writes a directory PyTorch loads strictly,
  holding exactly the run's parameters."""
  import subprocess
  import sys

  from configs import stage1
  from depthvlm_jax.runs import checkpoints, freeze, model_from_config

  config = stage1.get_config()
  model = model_from_config.build_model(config)
  params = random_params(model, seed=1)
  trainable, frozen = freeze.split_params(params, freeze.trainable_mask(params, list(map(tuple, config.train.trainable))))
  workdir = tmp_path / "run"
  (workdir).mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  mgr = checkpoints.manager(workdir / "checkpoints", 1, async_save=False)
  checkpoints.save(mgr, 3, {"step": np.int32(3), "params": trainable}, frozen, None)
  mgr.wait_until_finished()
  mgr.close()

  out = tmp_path / "exported"
  proc = subprocess.run([sys.executable, "-m", "depthvlm_jax.export", f"--checkpoint={workdir}", f"--out={out}"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
    assert (out / name).exists(), name
  DepthVLMForConditionalGeneration.from_pretrained(out)  # strict: every key present, none unexpected
  model2, params2 = hf_checkpoint.load_depthvlm(out)
  assert model2.head == model.head
  a, b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
  assert set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


# vision_config keys of the released Qwen3-VL-4B-Instruct config.json (and the authors' DepthVLM-4B)
RELEASED_VISION_KEYS = {"deepstack_visual_indexes", "depth", "hidden_act", "hidden_size", "in_channels",
                        "initializer_range", "intermediate_size", "model_type", "num_heads",
                        "num_position_embeddings", "out_hidden_size", "patch_size", "spatial_merge_size",
                        "temporal_patch_size"}


def test_export_layout_matches_the_official_checkpoint(tmp_path, jax_model, caplog):
  import json
  import os

  from tests.evaluation.helpers import random_params
  config, model, params = jax_model
  official = DepthVLM(config, head=DepthHeadConfig())
  old = os.umask(0o022)
  try:
    with caplog.at_level("WARNING"):
      out = export.write_hf_dir(random_params(official), config, official.head, tmp_path / "official",
                                processing_files=False)
    assert not caplog.records
    caplog.clear()
    with caplog.at_level("WARNING"):
      tiny = export.write_hf_dir(params, config, model.head, tmp_path / "tiny", processing_files=False)
  finally:
    os.umask(old)
  assert "cannot load it" in caplog.text and "features=32" in caplog.text
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"] and cfg["depth_head_type"] == "dpt"
  assert set(cfg["vision_config"]) == RELEASED_VISION_KEYS and cfg["vision_config"]["model_type"] == "qwen3_vl"
  assert "axial" not in (out / "config.json").read_text()
  text = cfg["text_config"]
  assert text["rope_scaling"]["mrope_section"] == list(config.text.mrope_section)  # transformers 4.x readers
  assert text["rope_theta"] == text["rope_parameters"]["rope_theta"] == config.text.rope_theta
  assert json.loads((tiny / "config.json").read_text())["architectures"] == ["DepthVLMForConditionalGeneration"]
  for d in (out, tiny):
    assert (d.stat().st_mode & 0o777) == 0o755  # not mkdtemp's 0700
  hf = transformers.AutoConfig.from_pretrained(out)
  assert Qwen3VLConfig.from_hf_dict(json.loads(hf.to_json_string())) == config
  model2, _ = hf_checkpoint.load_depthvlm(out)
  assert model2.head == DepthHeadConfig() and model2.config == config
