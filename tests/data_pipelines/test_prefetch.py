"""Bounded loader memory: the read-ahead `prefetch_plan` picks fits `data.prefetch_bytes`, and the
streams read no further than it."""

import json
import threading
import time

import numpy as np
import pytest

from data_pipelines import pipeline
from data_pipelines.skips import SOURCE_KEY
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.processing.image_processor import ImageProcessorConfig

SPECS = [pipeline.ExampleSpec((96, 128), 64, False), pipeline.ExampleSpec((128, 96), 64, False)]


def test_example_bytes_count_every_array():
  spec = pipeline.ExampleSpec((768, 1024), 896, False)
  # uint8 pixels, uint16 depth codes and their float32 unit, bool has_depth, int32 grid and tokens
  # (ids, mask, labels, 3 positions)
  assert spec.example_bytes() == 768 * 1024 * 3 + 768 * 1024 * 2 + 4 + 1 + 2 * 4 + 896 * 6 * 4


@pytest.mark.parametrize("workers", [0, 3])
def test_plan_is_the_largest_read_ahead_within_the_budget(workers):
  full = pipeline.prefetch_plan(SPECS, 8, workers, None).bound_bytes
  least = full - 7 * max(workers, 1) * sum(s.example_bytes() for s in SPECS)  # one example per stream
  for budget in (least, (least + full) // 2, full - 1, full, 10 * full):
    plan = pipeline.prefetch_plan(SPECS, 8, workers, budget)
    assert plan.bound_bytes <= budget and 1 <= plan.buffer <= 8 and plan.threads == min(16, plan.buffer)
    if plan.buffer < 8:
      assert pipeline.prefetch_plan(SPECS, 8, workers, None).bound_bytes > budget
      bigger = plan.bound_bytes + max(workers, 1) * sum(s.example_bytes() for s in SPECS)
      assert bigger > budget  # one more example per stream would not fit
  assert pipeline.prefetch_plan(SPECS, 8, workers, None).buffer == 8
  assert pipeline.prefetch_plan(SPECS, 8, workers, least).buffer == 1
  with pytest.raises(ValueError, match=f"data.prefetch_bytes={least - 1}: the loader needs at least {least} bytes"):
    pipeline.prefetch_plan(SPECS, 8, workers, least - 1)


class _Counting:
  """Stands in for `PrepareExample`: counts the examples prepared (the loader's read-ahead)."""
  made = 0
  lock = threading.Lock()

  def __init__(self, source, spec):
    self.label, self.spec = source.label, spec

  def __call__(self, record, rng=None):
    with _Counting.lock:
      _Counting.made += 1
    return {SOURCE_KEY: self.label, "x": np.zeros(4, np.float32)}


@pytest.mark.parametrize("budget_buffer", [None, 2])
def test_streams_read_no_further_than_the_plan(tmp_path, budget_buffer):
  lines = [{"image": f"{i}.png", "canonical_size": [130, 95] if i % 2 else [95, 130]} for i in range(400)]
  (tmp_path / "a.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  source = pipeline.SourceSpec(str(tmp_path / "a.jsonl"), str(tmp_path), str(tmp_path), name="a")
  ds = pipeline.make_dataset([source], [None], SPECS, Qwen3VLConfig.tiny(), None, ImageProcessorConfig(), seed=0,
                             prepare=_Counting)
  batch = 16
  budget = None
  if budget_buffer is not None:  # the budget that allows exactly this read-ahead
    fixed = pipeline.prefetch_plan(SPECS, batch, 0, None).bound_bytes - batch * sum(s.example_bytes() for s in SPECS)
    budget = fixed + budget_buffer * sum(s.example_bytes() for s in SPECS)
    assert pipeline.prefetch_plan(SPECS, batch, 0, budget).buffer == budget_buffer
  _Counting.made = 0
  it = iter(pipeline.batched(ds, batch, prefetch_bytes=budget))
  next(it)
  time.sleep(1.0)  # let the streams read ahead as far as they may
  ahead = _Counting.made - batch
  if budget_buffer is None:
    assert ahead >= batch  # one batch per stream: the other stream alone reads a batch ahead
  else:
    assert ahead <= len(SPECS) * (budget_buffer + 1), ahead
