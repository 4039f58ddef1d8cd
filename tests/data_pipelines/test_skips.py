"""Skipped samples are dropped, counted, carried through batching, and resume exactly."""

import grain
import numpy as np

from data_pipelines.skips import SKIP_REASONS, DropSkipped, Skipped, counts_to_dict


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
