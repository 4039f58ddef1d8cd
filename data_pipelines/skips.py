"""Skipped-sample accounting that survives multiprocess loading and checkpoints.

A sample that cannot be used becomes a `Skipped(reason)` marker instead of an example.
`DropSkipped` removes the markers and attaches their per-reason counts to the next real example
(`example["skip_counts"]`, an int32 vector over `SKIP_REASONS`), so the counts travel with the data
through worker processes and batching, and the trainer can log exact totals.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import numpy as np

SKIP_REASONS = ("bad_record", "unreadable_image", "missing_depth", "corrupt_depth", "no_valid_depth",
                "too_small", "too_long", "other")


@dataclasses.dataclass(frozen=True)
class Skipped:
  reason: str
  detail: str = ""

  def __post_init__(self):
    if self.reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {self.reason!r}; expected one of {SKIP_REASONS}")


def zero_counts() -> np.ndarray:
  return np.zeros(len(SKIP_REASONS), np.int32)


def counts_to_dict(counts: np.ndarray) -> dict[str, int]:
  return {r: int(c) for r, c in zip(SKIP_REASONS, np.asarray(counts).reshape(-1, len(SKIP_REASONS)).sum(0)) if c}


class _DropSkippedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._pending = zero_counts()

  def __next__(self) -> Any:
    while True:
      element = next(self._parent)
      if isinstance(element, Skipped):
        self._pending[SKIP_REASONS.index(element.reason)] += 1
        logging.warning("skipping sample: %s %s", element.reason, element.detail)
        continue
      element = dict(element)
      element["skip_counts"] = self._pending
      self._pending = zero_counts()
      return element

  def get_state(self):
    return {"parent": self._parent.get_state(), "pending": self._pending.tolist()}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._pending = np.asarray(state["pending"], np.int32)


class DropSkipped(grain.IterDataset):
  """Filters `Skipped` markers, moving their counts onto the next example."""

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> grain.DatasetIterator:
    return _DropSkippedIterator(self._parent.__iter__())
