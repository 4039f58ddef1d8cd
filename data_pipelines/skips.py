"""Skipped-sample accounting that survives multiprocess loading and checkpoints.

A sample that cannot be used becomes a `Skipped(reason)` marker instead of an example.
`DropSkipped` removes the markers and attaches their per-reason counts to the next real example
(`example["skip_counts"]`, an int32 vector over `SKIP_REASONS`), so the counts travel with the data
through worker processes and batching, and the trainer can log exact totals.

A source none of whose samples can be used would make that loop endless: examples and markers may
carry their source (`SOURCE_KEY`, `Skipped.source`), and once a source has given `give_up_after`
samples without one usable example, `SourceExhaustedError` stops the pipeline naming the source and
its last skip reason.

Given the names of the sources (`DropSkipped(..., sources=names)`), the counts are kept per source:
`skip_counts` is then (S, len(SKIP_REASONS)) and `drawn_counts` (S,) counts every sample drawn from
each source, usable or not, so skip rates per source and reason can be logged and checked
(`skip_report`, `check_skip_rates`).
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


class SkipRateError(SourceExhaustedError):
  """A data source skipped more than the allowed fraction of its samples (message names it)."""


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


def skip_report(skips: np.ndarray, drawn: np.ndarray, names) -> dict[str, dict[str, int]]:
  """{source: {"drawn": n, "skipped": k, reason: count, ...}} from (S, R) skips and (S,) drawn counts."""
  skips, drawn = np.asarray(skips).reshape(len(names), len(SKIP_REASONS)), np.asarray(drawn).reshape(len(names))
  return {name: {"drawn": int(n), "skipped": int(row.sum()), **counts_to_dict(row)}
          for name, row, n in zip(names, skips, drawn)}


def check_skip_rates(skips: np.ndarray, drawn: np.ndarray, names, max_rate: float, min_samples: int) -> None:
  """Raises `SkipRateError` (one line) for the first source that skipped more than `max_rate` of its
  samples once at least `min_samples` were drawn from it."""
  for name, r in skip_report(skips, drawn, names).items():
    if r["drawn"] >= min_samples and r["skipped"] > max_rate * r["drawn"]:
      reasons = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("drawn", "skipped"))
      raise SkipRateError(
          f"data source {name}: {r['skipped']} of {r['drawn']} samples skipped ({r['skipped'] / r['drawn']:.0%}: "
          f"{reasons}), above data.max_skip_rate={max_rate}; fix its records or files, or raise "
          f"data.max_skip_rate")


class _DropSkippedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, give_up_after: int, sources: tuple[str, ...] = ()):
    super().__init__(parent)
    self._rows = {name: i for i, name in reversed(list(enumerate(sources)))}  # first occurrence wins
    self._shape = (len(sources), len(SKIP_REASONS)) if sources else (len(SKIP_REASONS),)
    self._pending = np.zeros(self._shape, np.int32)
    self._drawn = np.zeros(max(len(sources), 1), np.int32)
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

  def _row(self, source) -> int:
    return self._rows.get(source, 0)

  def __next__(self) -> Any:
    while True:
      element = next(self._parent)
      if isinstance(element, Skipped):
        reason = SKIP_REASONS.index(element.reason)
        if len(self._shape) == 2:
          self._pending[self._row(element.source), reason] += 1
        else:
          self._pending[reason] += 1
        self._drawn[self._row(element.source)] += 1
        logging.warning("skipping sample: %s %s", element.reason, element.detail)
        self._count_skip(element)
        continue
      element = dict(element)
      source = element.pop(SOURCE_KEY, None)
      self._drawn[self._row(source)] += 1
      if source is not None and source not in self._usable:
        self._usable.add(str(source))
        self._unusable.pop(str(source), None)
      element["skip_counts"] = self._pending
      self._pending = np.zeros(self._shape, np.int32)
      if len(self._shape) == 2:
        element["drawn_counts"] = self._drawn
        self._drawn = np.zeros_like(self._drawn)
      return element

  def get_state(self):
    return {"parent": self._parent.get_state(), "pending": self._pending.tolist(), "drawn": self._drawn.tolist(),
            "unusable": dict(self._unusable), "usable": sorted(self._usable)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._pending = np.asarray(state["pending"], np.int32).reshape(self._shape)
    self._drawn = np.asarray(state["drawn"], np.int32)
    self._unusable = dict(state.get("unusable", {}))  # absent in checkpoints of older runs
    self._usable = set(state.get("usable", []))


class DropSkipped(grain.IterDataset):
  """Filters `Skipped` markers, moving their counts onto the next example; stops on an all-bad source."""

  def __init__(self, parent: grain.IterDataset, give_up_after: int = GIVE_UP_AFTER, sources=()):
    super().__init__(parent)
    self._give_up_after = give_up_after
    self._sources = tuple(sources)

  def __iter__(self) -> grain.DatasetIterator:
    return _DropSkippedIterator(self._parent.__iter__(), self._give_up_after, self._sources)
