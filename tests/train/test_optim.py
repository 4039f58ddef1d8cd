"""Freeze rules cover every parameter; split/merge round trip; schedule shape."""

import numpy as np
import pytest

from depthvlm_jax.train import optim
from depthvlm_jax.runs import freeze

PARAMS = {"visual": {"blocks_0": {"kernel": np.ones(2)}}, "language_model": {"norm": {"scale": np.ones(3)}},
          "depth_head": {"norm": {"scale": np.zeros(4)}}}


def test_mask_first_match_wins_and_split_merge_round_trip():
  mask = freeze.trainable_mask(PARAMS, [("depth_head/.*", True), (".*", False)])
  assert mask == {("visual", "blocks_0", "kernel"): False, ("language_model", "norm", "scale"): False,
                  ("depth_head", "norm", "scale"): True}
  trainable, frozen = freeze.split_params(PARAMS, mask)
  assert list(trainable) == ["depth_head"] and set(frozen) == {"visual", "language_model"}
  merged = freeze.merge_params(trainable, frozen)
  assert {k: set(v) for k, v in merged.items()} == {k: set(v) for k, v in PARAMS.items()}


def test_uncovered_and_unused_rules_fail():
  with pytest.raises(freeze.FreezeRuleError, match="match no trainable/frozen rule"):
    freeze.trainable_mask(PARAMS, [("depth_head/.*", True)])
  with pytest.raises(freeze.FreezeRuleError, match="match no parameter"):
    freeze.trainable_mask(PARAMS, [("depht_head/.*", True), (".*", False)])


def test_schedule_warmup_then_cosine_to_zero():
  s = optim.learning_rate_schedule(1.0, 100, 0.04)
  assert float(s(0)) == 0.0 and abs(float(s(4)) - 1.0) < 1e-6
  assert float(s(50)) < 1.0 and abs(float(s(100))) < 1e-6
