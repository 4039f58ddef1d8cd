"""LoRA fine-tuning end to end: which parameters train, a stage-2 LoRA run killed with SIGKILL and
restarted ends exactly as an uninterrupted one, its checkpoints hold the trainable parameters only
(adapters and depth head), and its export loads in PyTorch as plain weights giving the adapted
model's outputs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict as flatten

from configs import stage1, stage2
from data_pipelines import synthetic
from depthvlm_jax import sharding
from depthvlm_jax.model import lora
from depthvlm_jax.model.depthvlm import DepthVLM, random_params
from depthvlm_jax.runs import checkpoints, freeze, model_from_config
from tests.train.test_resume import OVERRIDES, ROOT, final_params, final_steps, finish, train_rows

STEPS = 6
RANK = 4
LORA = [f"--config.train.lora_rank={RANK}", "--config.train.lora_alpha=8.0"]


def _config(stage_module, **changes):
  c = ml_collections.ConfigDict(stage_module.get_config().to_dict())
  c.update_from_flattened_dict(changes)  # dotted names, as on the command line
  return c


def _split(config):
  model = model_from_config.build_model(config)
  like, mask = model_from_config.params_like(config, model, sharding.make_mesh({}, jax.devices()[:1]))
  return model, like, mask


def test_lora_trains_adapters_and_head_and_freezes_the_llm():
  model, like, mask = _split(_config(stage2, **{"train.lora_rank": RANK, "model_init": ""}))
  trainable = sorted("/".join(p) for p, t in mask.items() if t)
  assert all(p.startswith("depth_head/") or lora.is_adapter(tuple(p.split("/"))) for p in trainable)
  assert len([p for p in trainable if not p.startswith("depth_head/")]) == 4 * 7 * 2  # 4 layers x 7 projections
  assert any(p.startswith("depth_head/") for p in trainable)
  frozen = {"/".join(p) for p, t in mask.items() if not t}
  assert "language_model/layers_0/self_attn/q_proj/kernel" in frozen and "lm_head/kernel" in frozen
  assert "language_model/embed_tokens" in frozen
  # rank 0 (the default): the plain model, the split of `train.trainable` alone
  config = _config(stage2, **{"model_init": ""})
  model, like, mask = _split(config)
  assert type(model) is DepthVLM
  assert not any(lora.is_adapter(p) for p in flatten(like))
  assert mask == freeze.trainable_mask(like, list(map(tuple, config.train.trainable)))


def _stage1_run(workdir: pathlib.Path):
  """A finished stage-1 run to start from (`model_init`): random parameters saved as its checkpoint."""
  config = _config(stage1, **{"model.dpt_features": 16, "model.dpt_out_channels": (8, 16, 16, 16),
                              "model.dpt_head_features": 8})
  params = random_params(model_from_config.build_model(config), seed=1)
  trainable, frozen = freeze.split_params(params, freeze.trainable_mask(params, list(map(tuple, config.train.trainable))))
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  mgr = checkpoints.manager(workdir / "checkpoints", 1, async_save=False)
  checkpoints.save(mgr, 3, {"step": np.int32(3), "params": trainable}, frozen, None)
  mgr.wait_until_finished()
  mgr.close()
  return params


def launch(workdir, data_dir, model_init, *extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, str(ROOT / "main.py"), "--config=configs/stage2.py", f"--workdir={workdir}",
         f"--config.data.synthetic_dir={data_dir}", f"--config.model_init={model_init}", *OVERRIDES,
         f"--config.train.total_steps={STEPS}", *LORA, *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("lora")
  data = base / "data"
  synthetic.ensure_synthetic_dataset(data, 12, 2, 0)
  start = _stage1_run(base / "stage1")
  ref, killed = base / "uninterrupted", base / "killed"
  finish(launch(ref, data, base / "stage1"))
  proc = launch(killed, data, base / "stage1")
  deadline = time.time() + 600
  while not final_steps(killed / "checkpoints") and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  out, _ = proc.communicate()
  return base, data, start, ref, killed, proc.returncode, out


@pytest.mark.slow
def test_killed_lora_run_resumes_exactly(runs):
  base, data, _, ref, killed, code, out = runs
  assert code == -signal.SIGKILL, out[-3000:]
  done = final_steps(killed / "checkpoints")
  assert done and done[-1] < STEPS, (done, out[-3000:])
  finish(launch(killed, data, base / "stage1"))
  assert final_steps(killed / "checkpoints")[-1] == STEPS
  rows = train_rows(ref)
  assert sorted(rows) == list(range(1, STEPS + 1)) and train_rows(killed) == rows  # bit for bit
  assert rows[STEPS]["loss"] != rows[1]["loss"]  # it trains
  flat_ref, flat_got = final_params(ref), final_params(killed)
  assert flat_ref.keys() == flat_got.keys()
  for k in flat_ref:
    np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(flat_ref[k]), err_msg=str(k))


@pytest.mark.slow
def test_lora_checkpoint_holds_adapters_and_head_only(runs):
  base, _, start, ref, _, _, _ = runs
  trainable, frozen = checkpoints.restore_params(ref)
  t, f = flatten(trainable), flatten(frozen)
  adapters = [k for k in t if lora.is_adapter(k)]
  assert len(adapters) == 4 * 7 * 2 and set(t) - set(adapters) == {k for k in t if k[0] == "depth_head"}
  assert {k[0] for k in f} == {"language_model", "lm_head", "visual"} and not any(lora.is_adapter(k) for k in f)
  # the LLM's weights are the stage-1 run's, untouched; the adapters moved off their start (B = 0)
  s = flatten(start)
  for k in f:
    np.testing.assert_array_equal(np.asarray(f[k]), np.asarray(s[k]), err_msg=str(k))
  assert all(np.abs(np.asarray(t[k])).max() > 0 for k in adapters if k[-1] == "kernel_lora_b")
  # bytes: each step holds the trainable parameters and two Adam moments, nothing of the LLM
  trainable_bytes = sum(np.asarray(x).nbytes for x in t.values())
  llm_bytes = sum(np.asarray(x).nbytes for k, x in f.items() if k[0] in ("language_model", "lm_head"))
  step_dir = ref / "checkpoints" / str(STEPS)
  step_bytes = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
  assert step_bytes < 3 * trainable_bytes + 2**20, (step_bytes, trainable_bytes)
  assert step_bytes * 20 < llm_bytes, (step_bytes, llm_bytes)


@pytest.mark.slow
def test_lora_export_loads_in_pytorch_and_matches_the_adapted_model(runs, tmp_path):
  import transformers

  from depthvlm_jax.torch_export import DepthVLMForConditionalGeneration
  from tests.test_export import _compare

  _, _, _, ref, _, _, _ = runs
  out = tmp_path / "exported"
  proc = subprocess.run([sys.executable, "-m", "depthvlm_jax.export", f"--checkpoint={ref}", f"--out={out}"],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  torch_model = DepthVLMForConditionalGeneration.from_pretrained(out).eval()  # strict: every key, none extra
  plain, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and all(k.startswith("depth_head.") for k in info["unexpected_keys"])
  # our adapted (unmerged) forward against PyTorch on the merged weights
  config = ml_collections.ConfigDict(json.loads((ref / "config.json").read_text()))
  model = model_from_config.build_model(config)
  params = freeze.merge_params(*checkpoints.restore_params(ref))
  assert any(lora.is_adapter(k) for k in flatten(params))
  _compare(model.config, model, params, torch_model)


def test_resume_refuses_a_changed_lora_setting(tmp_path):
  """The adapters shape the parameter and optimizer trees: a resume may not change them. A run recorded
  before the LoRA settings existed counts as rank 0."""
  from depthvlm_jax.model.config import ConfigError
  from depthvlm_jax.train import run_record

  full = _config(stage2)
  old = json.loads(full.to_json_best_effort())
  for k in ("lora_rank", "lora_alpha", "lora_targets"):
    del old["train"][k]
  assert run_record.check_resume_config(old, full, tmp_path) == []
  with pytest.raises(ConfigError, match=r"changed: train.lora_rank: 0 -> 4\b"):
    run_record.check_resume_config(old, _config(stage2, **{"train.lora_rank": 4}), tmp_path)
  recorded = json.loads(_config(stage2, **{"train.lora_rank": 4}).to_json_best_effort())
  with pytest.raises(ConfigError, match=r"changed: train.lora_alpha: 16.0 -> 32.0"):
    run_record.check_resume_config(recorded, _config(stage2, **{"train.lora_rank": 4, "train.lora_alpha": 32.0}),
                                   tmp_path)
