"""The trainer's held-out δ1: one compiled step for every call and source, padded last batch == no
padding, 8-device sharded == one device, unpreparable records skipped, the streamed best constant."""

import json

import jax
import numpy as np
import pytest

from data_pipelines import pipeline, synthetic
from depthvlm_jax import sharding
from depthvlm_jax.evaluation import step as eval_step
from depthvlm_jax.evaluation.loading import param_shardings
from depthvlm_jax.evaluation.metrics import best_constant_delta1
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, random_params
from depthvlm_jax.processing import depth_codes
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.processing.tokenizer import load_tokenizer
from depthvlm_jax.train import depth_eval

# the synthetic scenes are 96x128 in the canonical camera: one bucket of that size (scale 1, so the
# random model's depth and the targets overlap and δ1 is neither 0 nor 1)
SPEC = pipeline.ExampleSpec((96, 128), 128, with_answer=False)
NUM_TEST = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_data")
  paths = synthetic.ensure_synthetic_dataset(root, 2, NUM_TEST, seed=3)
  # A second source: the same records plus one whose image is missing (a skipped record).
  lines = paths["test"].read_text().splitlines()
  broken = json.loads(lines[0])
  broken["image"] = "missing/no_such_image.png"
  (root / "with_missing.jsonl").write_text("\n".join(lines + [json.dumps(broken)]) + "\n")
  sources = {"test": pipeline.SourceSpec(str(paths["test"]), str(root), str(root), "synthetic"),
             "with_missing": pipeline.SourceSpec(str(root / "with_missing.jsonl"), str(root), str(root), "synthetic")}
  model = DepthVLM(Qwen3VLConfig.tiny(), head=DepthHeadConfig.tiny())
  return model, random_params(model, seed=1), sources, load_tokenizer(None), ImageProcessorConfig()


def _evaluate(setup, mesh, per_device_batch, calls=1, names=("test",)):
  """Results of `calls` evaluations of each named source with one step, and that step's compile count."""
  model, params, sources, tok, proc = setup
  shardings = param_shardings(model, mesh)
  params = sharding.place_params(params, shardings)
  step = eval_step.jit_delta1(model, mesh, shardings)
  sets = [depth_eval.make_eval_set(n, sources[n], SPEC, model.config, tok, proc, mesh, per_device_batch)
          for n in names]
  compiles = []

  def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") == "jit(delta1_step)":
      compiles.append(kwargs["fun_name"])

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    results = [[depth_eval.evaluate_depth(step, params, s, mesh) for s in sets] for _ in range(calls)]
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  return results, sets, len(compiles)


def _gt_maps(setup):
  model, _, sources, tok, proc = setup
  prepare = pipeline.PrepareExample(sources["test"], SPEC, model.config, tok, proc)
  return [depth_codes.batch_depth(prepare(r)) for r in pipeline.load_records(sources["test"])[0]]


@pytest.fixture(scope="module")
def unpadded(setup):
  """One device, one batch of all five records: no padding."""
  (result,), sets, _ = _evaluate(setup, sharding.make_mesh({"data": 1}, jax.devices()[:1]), NUM_TEST)
  assert sets[0].global_batch == NUM_TEST and sets[0].num_batches == 1
  return result[0]


@pytest.mark.slow
def test_one_compile_padded_last_batch_and_skips(setup, unpadded):
  one_device = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  # batches of 2: the last of each source is padded (5 records: 2, 2, 1 + 1 pad; 6: 2, 2, 2 with one skip)
  results, sets, compiles = _evaluate(setup, one_device, 2, calls=2, names=("test", "with_missing"))
  assert compiles == 1  # two calls x two sources, one program (one bucket)
  assert [s.global_batch for s in sets] == [2, 2] and [s.num_batches for s in sets] == [3, 3]
  assert unpadded["images"] == NUM_TEST and unpadded["skipped"] == 0 and 0 < unpadded["delta1"] < 1
  for test, missing in results:
    assert test["images"] == missing["images"] == NUM_TEST
    assert test["skipped"] == 0 and missing["skipped"] == 1
    np.testing.assert_allclose(test["delta1"], unpadded["delta1"], rtol=1e-6)
    np.testing.assert_allclose(missing["delta1"], unpadded["delta1"], rtol=1e-6)
  constant = best_constant_delta1(_gt_maps(setup))
  for test, missing in results:  # accumulated on the first pass, kept
    assert (test["best_constant_m"], test["best_constant_delta1"]) == pytest.approx(constant, rel=1e-12)
    assert (missing["best_constant_m"], missing["best_constant_delta1"]) == pytest.approx(constant, rel=1e-12)


@pytest.mark.slow
def test_sharded_over_eight_devices_equals_one_device(setup, unpadded):
  assert jax.device_count() == 8
  (sharded,), sets, compiles = _evaluate(setup, sharding.make_mesh({"data": 4, "fsdp": 2}), 1)
  assert sets[0].global_batch == 8 and sets[0].num_batches == 1 and compiles == 1  # 5 records + 3 pad rows
  assert sharded[0]["images"] == NUM_TEST
  np.testing.assert_allclose(sharded[0]["delta1"], unpadded["delta1"], rtol=1e-5)
  assert sharded[0]["best_constant_m"] == unpadded["best_constant_m"]


def test_eval_batch_size():
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  assert depth_eval.global_batch_size(mesh, 4, 1000) == 32
  assert depth_eval.global_batch_size(mesh, 4, 5) == 8  # a small set: one row per device
  assert depth_eval.global_batch_size(mesh, 4, 20) == 24
