"""Distance-QA evaluation: parsing, scoring against an independent computation, and one real greedy pass."""

import numpy as np
import pytest

from data_pipelines import pipeline, synthetic
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, random_params
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.processing.tokenizer import load_tokenizer
from depthvlm_jax.train import qa_eval


def test_parse_and_score():
  assert qa_eval.parse_metres("About 3.4 meters.") == 3.4
  assert qa_eval.parse_metres("about 12 m") == 12.0 and qa_eval.parse_metres("far away") is None
  s = qa_eval.score([3.0, None, 10.0], [2.0, 5.0, 12.0], constant=4.0, class_prior=[2.5, 4.0, 20.0])
  assert s["n"] == 3 and s["parse_rate"] == pytest.approx(2 / 3)
  assert s["mae_m"] == pytest.approx((1.0 + 2.0) / 2)
  assert s["constant_mae_m"] == pytest.approx((2.0 + 1.0 + 8.0) / 3)
  assert s["class_prior_mae_m"] == pytest.approx((0.5 + 1.0 + 8.0) / 3)
  assert qa_eval.object_class("How far is the light blue van from the camera, in meters?") == "van"


def test_greedy_answers_on_held_out_questions(tmp_path):
  paths = synthetic.ensure_synthetic_dataset(tmp_path, 4, 2, 0)
  questions = qa_eval.distance_questions(str(paths["qa_test"]), 3)
  assert questions and all(q.prompt.startswith("How far") for q, _ in questions)
  config = Qwen3VLConfig.tiny()
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  params = random_params(model, seed=0)
  source = pipeline.SourceSpec(str(paths["qa_test"]), str(tmp_path), "", "synthetic", with_depth=False)
  out = qa_eval.evaluate_distance_qa(model, params, source, [pipeline.ExampleSpec((64, 96), 64, False)],
                                     load_tokenizer(None), ImageProcessorConfig(),
                                     str(paths["qa"]), limit=3, batch_size=2, max_new_tokens=3)
  assert out["n"] == len(questions) and 0.0 <= out["parse_rate"] <= 1.0
  train_d = [d for _, d in qa_eval.distance_questions(str(paths["qa"]), 10**9)]
  want = np.mean([abs(np.median(train_d) - d) for _, d in questions])
  assert out["constant_mae_m"] == pytest.approx(want)
  by_class = {}
  for q, d in qa_eval.distance_questions(str(paths["qa"]), 10**9):
    by_class.setdefault(q.prompt.split(" from the camera")[0].split()[-1], []).append(d)
  prior = [np.median(by_class.get(q.prompt.split(" from the camera")[0].split()[-1], train_d)) for q, _ in questions]
  assert out["class_prior_mae_m"] == pytest.approx(np.mean([abs(p - d) for p, (_, d) in zip(prior, questions)]))
  assert len(out["examples"]) == len(questions) and all(isinstance(e["answer"], str) for e in out["examples"])
