"""Loading HF Qwen3-VL directories (single and sharded safetensors) through the key map."""

import json

import jax
import numpy as np
from flax import traverse_util
import pytest
import safetensors.numpy

from depthvlm_jax.model import hf_checkpoint, hf_params
from depthvlm_jax.model.config import ConfigError, Qwen3VLConfig
from tests.model import hf_reference as ref


@pytest.fixture(scope="module")
def hf_model():
  config = Qwen3VLConfig.tiny()
  return config, ref.make_hf_model(config, seed=7)


@pytest.mark.parametrize("shard_size", [None, "300KB"])
def test_load_saved_directory_matches_state_dict(tmp_path, hf_model, shard_size):
  config, hf = hf_model
  kw = {} if shard_size is None else {"max_shard_size": shard_size}
  hf.save_pretrained(tmp_path, **kw)
  if shard_size:
    assert (tmp_path / "model.safetensors.index.json").exists()
  loaded_config, params = hf_checkpoint.load_qwen3_vl(tmp_path)
  assert loaded_config == config
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  flat = traverse_util.flatten_dict(params)
  assert len(flat) == len(state)
  for key, value in hf_params.params_to_hf(params, config):
    np.testing.assert_array_equal(value, state[key])


def test_key_map_round_trip_paths():
  for key in ["model.visual.blocks.3.attn.qkv.weight", "model.visual.deepstack_merger_list.2.norm.bias",
              "model.language_model.layers.10.self_attn.q_norm.weight", "model.visual.pos_embed.weight",
              "model.visual.patch_embed.proj.bias", "lm_head.weight", "model.language_model.norm.weight",
              "model.language_model.embed_tokens.weight", "model.visual.merger.linear_fc2.weight"]:
    path, _ = hf_params.hf_key_to_path(key)
    assert hf_params.path_to_hf_key(path) == key


def test_mismatch_errors_list_every_key(tmp_path, hf_model):
  config, hf = hf_model
  state = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
  state["model.visual.blocks.0.attn.qkv.weight"] = state["model.visual.blocks.0.attn.qkv.weight"][:-1]
  del state["model.language_model.layers.1.mlp.up_proj.weight"]
  state["model.language_model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
  with pytest.raises(hf_params.KeyMapError) as err:
    hf_checkpoint.load_qwen3_vl(tmp_path)
  msg = str(err.value)
  assert "model.language_model.layers.1.mlp.extra.weight" in msg
  assert "model.visual.blocks.0.attn.qkv.weight" in msg
  assert "language_model/layers_1/mlp/up_proj/kernel" in msg


def test_bad_directories_have_clear_errors(tmp_path, hf_model):
  config, _ = hf_model
  with pytest.raises(hf_checkpoint.CheckpointError, match="config.json"):
    hf_checkpoint.load_qwen3_vl(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
  (tmp_path / "pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(hf_checkpoint.CheckpointError, match="allow_pickle"):
    hf_checkpoint.load_qwen3_vl(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(hf_checkpoint.CheckpointError, match="corrupt"):
    hf_checkpoint.load_qwen3_vl(tmp_path)


def test_config_from_transformers4_layout_and_validation():
  d = Qwen3VLConfig.tiny().to_hf_dict()
  rope = d["text_config"].pop("rope_parameters")
  d["text_config"]["rope_theta"] = rope["rope_theta"]
  d["text_config"]["rope_scaling"] = {"rope_type": "default", "mrope_section": rope["mrope_section"],
                                      "mrope_interleaved": True}
  assert Qwen3VLConfig.from_hf_dict(d) == Qwen3VLConfig.tiny()
  d["text_config"]["rope_scaling"]["mrope_section"] = [1, 1, 1]
  with pytest.raises(ConfigError, match="mrope_section"):
    Qwen3VLConfig.from_hf_dict(d)
