"""Collectives of an optimised HLO module, read from its text: count and bytes of each kind per
execution, with while-loop bodies multiplied by their trip counts."""

from __future__ import annotations

import collections
import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
                "s4": 0.5, "u4": 0.5}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMP_START = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")


def _shape_bytes(text: str) -> int:
  total = 0.0
  for dtype, dims in _SHAPE.findall(text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def _condition_trips(lines: list[str]) -> int:
  """Trip count of a counted loop from its condition computation: `ROOT compare(counter, N),
  direction=LT` with N an s32 constant, the form `lax.scan` / `fori_loop` from 0 lower to (1 when the
  condition has another form)."""
  consts = {}
  for line in lines:
    m = re.match(r"^\s*%?([\w.\-]+)\s*=\s*s32\[\]\S*\s+constant\((\d+)\)", line)
    if m:
      consts[m.group(1)] = int(m.group(2))
  for line in lines:
    m = re.match(r"^\s*ROOT\s.*\scompare\(([^)]*)\).*direction=LT", line)
    if m:
      operands = re.findall(r"%?([\w.\-]+)$", m.group(1).split(",")[-1].strip())
      if operands and operands[0] in consts:
        return consts[operands[0]]
  return 1


def collective_stats(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {"count": n, "bytes": b}} over one execution of an optimised HLO module.

  Each collective's bytes are its result's (for async pairs the `-done`'s, the gathered or reduced
  output). Computations are walked from ENTRY: a while body counts its trip count times, every other
  called computation once per call. The trip count is `known_trip_count` in the while's backend
  config where there is one; the TPU compiler's optimised HLO has none, so otherwise it is read off
  the loop condition (`_condition_trips`).
  """
  comps: dict[str, list[str]] = {}
  entry = None
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP_START.match(line)
      if m and "=" not in line.split("{")[0].split("(")[0]:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    comps[current].append(line)

  own: dict[str, collections.Counter] = {}
  calls: dict[str, list[tuple[str, int]]] = {}
  for name, lines in comps.items():
    counter: collections.Counter = collections.Counter()
    edges = []
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      shape, op = m.group(1), m.group(2)
      base = op[:-5] if op.endswith("-done") else op
      if base in COLLECTIVES and not op.endswith("-start"):
        counter[(base, "count")] += 1
        counter[(base, "bytes")] += _shape_bytes(shape)
      if op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        body = re.search(r"body=%?([\w.\-]+)", line)
        cond = re.search(r"condition=%?([\w.\-]+)", line)
        n = int(trips.group(1)) if trips else _condition_trips(comps.get(cond.group(1), []) if cond else [])
        if body:
          edges.append((body.group(1), n))
        if cond:
          edges.append((cond.group(1), n + 1))
      else:
        for attr in ("calls", "to_apply", "branch_computations", "true_computation", "false_computation"):
          for group in re.findall(rf"{attr}=\{{?([^}},]+(?:,\s*%?[\w.\-]+)*)\}}?", line):
            for callee in re.findall(r"%?([\w.\-]+)", group):
              if callee in comps:
                edges.append((callee, 1))
    own[name] = counter
    calls[name] = edges

  total: collections.Counter = collections.Counter()
  memo: dict[str, collections.Counter] = {}

  def visit(name: str, depth: int = 0) -> collections.Counter:
    if name in memo:
      return memo[name]
    out = collections.Counter(own.get(name, {}))
    if depth < 64:
      for callee, n in calls.get(name, []):
        for k, v in visit(callee, depth + 1).items():
          out[k] += n * v
    memo[name] = out
    return out

  if entry is not None:
    total = visit(entry)
  kinds = sorted({k for k, _ in total})
  return {k: {"count": int(total[(k, "count")]), "bytes": int(total[(k, "bytes")])} for k in kinds}
