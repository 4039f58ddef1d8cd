"""Skipped-sample accounting that survives multiprocess loading and checkpoints.

A sample that cannot be used becomes a `Skipped(reason)` marker instead of an example.
`DropSkipped` removes the markers and attaches their per-reason counts to the next real example
(`example["skip_counts"]`, an int32 vector over `SKIP_REASONS`), so the counts travel with the data
through worker processes and batching, and the trainer can log exact totals.

A source none of whose samples can be used would make that loop endless: examples and markers may
carry their source (`SOURCE_KEY`, `Skipped.source`), and once a source has given `give_up_after`
samples without one usable example, `SourceExhaustedError` stops the pipeline naming the source and
its last skip reason.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import numpy as np

SKIP_REASONS = ("bad_record", "unreadable_image", "missing_depth", "corrupt_depth", "no_valid_depth",
                "too_small", "too_long", "other")


SOURCE_KEY = "_source"  # example key naming the source; removed by DropSkipped
GIVE_UP_AFTER = 200


class SourceExhaustedError(RuntimeError):
  """A data source gave only unusable samples (message names it and the last reason)."""


@dataclasses.dataclass(frozen=True)
class Skipped:
  reason: str
  detail: str = ""
  source: str = ""

  def __post_init__(self):
    if self.reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {self.reason!r}; expected one of {SKIP_REASONS}")


def zero_counts() -> np.ndarray:
  return np.zeros(len(SKIP_REASONS), np.int32)


def counts_to_dict(counts: np.ndarray) -> dict[str, int]:
  return {r: int(c) for r, c in zip(SKIP_REASONS, np.asarray(counts).reshape(-1, len(SKIP_REASONS)).sum(0)) if c}


class _DropSkippedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, give_up_after: int):
    super().__init__(parent)
    self._pending = zero_counts()
    self._give_up_after = give_up_after
    self._unusable: dict[str, int] = {}  # source -> samples seen, all skipped so far
    self._usable: set[str] = set()

  def _count_skip(self, element: Skipped) -> None:
    source = element.source
    if not source or source in self._usable:
      return
    n = self._unusable[source] = self._unusable.get(source, 0) + 1
    if n >= self._give_up_after:
      raise SourceExhaustedError(
          f"{source}: the first {n} samples drawn from this source were all skipped, none usable (last: "
          f"{element.reason}: {element.detail}); fix its records or files, or remove it from the data")

  def __next__(self) -> Any:
    while True:
      element = next(self._parent)
      if isinstance(element, Skipped):
        self._pending[SKIP_REASONS.index(element.reason)] += 1
        logging.warning("skipping sample: %s %s", element.reason, element.detail)
        self._count_skip(element)
        continue
      element = dict(element)
      source = element.pop(SOURCE_KEY, None)
      if source is not None and source not in self._usable:
        self._usable.add(str(source))
        self._unusable.pop(str(source), None)
      element["skip_counts"] = self._pending
      self._pending = zero_counts()
      return element

  def get_state(self):
    return {"parent": self._parent.get_state(), "pending": self._pending.tolist(),
            "unusable": dict(self._unusable), "usable": sorted(self._usable)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._pending = np.asarray(state["pending"], np.int32)
    self._unusable = dict(state.get("unusable", {}))  # absent in checkpoints of older runs
    self._usable = set(state.get("usable", []))


class DropSkipped(grain.IterDataset):
  """Filters `Skipped` markers, moving their counts onto the next example; stops on an all-bad source."""

  def __init__(self, parent: grain.IterDataset, give_up_after: int = GIVE_UP_AFTER):
    super().__init__(parent)
    self._give_up_after = give_up_after

  def __iter__(self) -> grain.DatasetIterator:
    return _DropSkippedIterator(self._parent.__iter__(), self._give_up_after)
