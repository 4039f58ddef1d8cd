"""Skipped samples are dropped, counted, carried through batching, and resume exactly."""

import grain
import numpy as np
import pytest

from data_pipelines.skips import (SKIP_REASONS, SOURCE_KEY, DropSkipped, Skipped, SkipRateError, check_skip_rates,
                                  counts_to_dict, skip_report)


def _dataset():
  items = [{"x": np.int32(i)} if i % 3 else Skipped("corrupt_depth", f"item {i}") for i in range(12)]
  return DropSkipped(grain.MapDataset.source(items).to_iter_dataset()).batch(2)


def test_skips_are_dropped_and_counted():
  batches = list(_dataset())
  xs = np.concatenate([b["x"] for b in batches])
  assert xs.tolist() == [i for i in range(12) if i % 3]
  total = sum(b["skip_counts"].sum(0) for b in batches)
  assert counts_to_dict(total) == {"corrupt_depth": 4}  # items 0, 3, 6, 9
  assert total[SKIP_REASONS.index("corrupt_depth")] == 4


def test_iterator_state_resumes_exactly():
  it = iter(_dataset())
  next(it)
  state = it.get_state()
  rest = [b["x"].tolist() for b in it]
  it2 = iter(_dataset())
  it2.set_state(state)
  assert [b["x"].tolist() for b in it2] == rest


def _two_sources():
  """Source "a": every third sample corrupt; source "b": every sample usable; interleaved."""
  items = []
  for i in range(12):
    items.append({"x": np.int32(i), SOURCE_KEY: "a"} if i % 3 else Skipped("corrupt_depth", f"a {i}", "a"))
    items.append({"x": np.int32(100 + i), SOURCE_KEY: "b"})
  return DropSkipped(grain.MapDataset.source(items).to_iter_dataset(), sources=("a", "b")).batch(2)


def test_counts_per_source_and_reason():
  batches = list(_two_sources())
  skips = sum(b["skip_counts"].sum(0) for b in batches)
  drawn = sum(b["drawn_counts"].sum(0) for b in batches)
  assert skips.shape == (2, len(SKIP_REASONS)) and drawn.tolist() == [12, 12]
  assert skip_report(skips, drawn, ("a", "b")) == {"a": {"drawn": 12, "skipped": 4, "corrupt_depth": 4},
                                                    "b": {"drawn": 12, "skipped": 0}}


def test_skip_rate_above_the_threshold_stops_with_the_source_named():
  skips = np.zeros((2, len(SKIP_REASONS)), np.int64)
  skips[0, SKIP_REASONS.index("no_valid_depth")] = 600
  skips[0, SKIP_REASONS.index("corrupt_depth")] = 12
  drawn = np.array([1000, 5000])
  check_skip_rates(skips, np.array([999, 5000]), ["waymo", "ddad"], 0.5, 1000)  # too few samples yet
  check_skip_rates(skips, drawn, ["waymo", "ddad"], 0.7, 1000)  # under the threshold
  with pytest.raises(SkipRateError) as e:
    check_skip_rates(skips, drawn, ["waymo", "ddad"], 0.5, 1000)
  assert str(e.value) == ("data source waymo: 612 of 1000 samples skipped (61%: corrupt_depth 12, no_valid_depth "
                          "600), above data.max_skip_rate=0.5; fix its records or files, or raise data.max_skip_rate")
  assert "\n" not in str(e.value)
