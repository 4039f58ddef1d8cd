"""Evaluation summary: per-dataset and average means of each metric, the skip report, the text table.

Input rows are the per-image lines `runner.run` writes to `per_image.jsonl`.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np

from depthvlm_jax.evaluation import metrics, protocol

RESULTS_FILE = "per_image.jsonl"  # one line per image (written by `runner.run`; named in the skip report)

SKIP_EXAMPLES = 5  # file:line messages kept per dataset in the summary


def line_of(source: str) -> int:
  """Line number of a "file:line" source."""
  return int(source.rsplit(":", 1)[1])


def summarize(rows: Sequence[dict], datasets: Sequence[Any], modes: Sequence[str], protocol_name: str,
              bad_lines: dict[str, list[str]] | None = None) -> dict[str, Any]:
  """Per-dataset means of every metric per mode, the frames used, skips, and the dataset average.

  Correct protocol: images without a valid point (`empty`) are left out of every mean. Official: they
  count δ1 = 0 (the authors' average); the other metrics, which the authors do not report, average the
  non-empty images.
  """
  conv = protocol.conventions(protocol_name)
  out: dict[str, Any] = {"protocol": protocol_name, "datasets": {}, "average": {}}
  bad_lines = bad_lines or {}
  for ds in datasets:
    mine = sorted((r for r in rows if r["dataset"] == ds.name), key=lambda r: line_of(r["source"]))
    skipped = [r for r in mine if "skipped" in r]
    messages = sorted([(line_of(r["source"]), r["detail"]) for r in skipped] +
                      [(line_of(m.split(": ", 1)[0]), m) for m in bad_lines.get(ds.name, [])])
    counts = collections.Counter(r["skipped"] for r in skipped)
    if bad_lines.get(ds.name):
      counts["bad_line"] = len(bad_lines[ds.name])
    entry: dict[str, Any] = {"images": len(mine) - len(skipped), "skipped": dict(counts),
                             "skip_messages": [m for _, m in messages[:SKIP_EXAMPLES]]}
    for mode in modes:
      res = [r["results"][mode] for r in mine if mode in r.get("results", {})]
      used = [x for x in res if x["count"] > 0]
      m = {"images": len(res) if conv.empty_counts_zero else len(used), "empty": len(res) - len(used)}
      m.update({k: float(np.mean([x[k] for x in used])) if used else None for k in metrics.METRIC_NAMES})
      if conv.empty_counts_zero and res:
        m["delta1"] = float(np.sum([x["delta1"] for x in used]) / len(res))
      if mode == "sparse":
        m["frames"] = dict(collections.Counter(x["frame"] for x in res))
        m["points"] = int(sum(x["count"] for x in used))
      entry[mode] = m
    out["datasets"][ds.name] = entry
  for mode in modes:
    have = [e[mode] for e in out["datasets"].values() if e[mode]["images"]]
    out["average"][mode] = ({k: float(np.mean([e[k] for e in have if e[k] is not None]))
                             if any(e[k] is not None for e in have) else None for k in metrics.METRIC_NAMES}
                            if have else None)
    if have:
      out["average"][mode]["datasets"] = len(have)
      out["average"][mode]["images"] = int(sum(e["images"] for e in have))
  return out


_COLUMNS = (("delta1", "δ1"), ("delta2", "δ2"), ("delta3", "δ3"), ("abs_rel", "AbsRel"), ("sq_rel", "SqRel"),
            ("rmse", "RMSE"), ("rmse_log", "RMSElog"), ("silog", "SILog"))


_CELLS = {"delta1": (10, 6)}  # (width, decimals); δ1, the headline, to the 6 decimals the authors print


def _cell(key: str, value: float | None) -> str:
  width, decimals = _CELLS.get(key, (9, 4))
  return f"{value:>{width}.{decimals}f}" if value is not None else f"{'-':>{width}}"


def format_skips(summary: dict[str, Any]) -> str:
  """"skipped records" block: per dataset, count per reason and the first file:line messages."""
  lines = []
  for name, e in summary["datasets"].items():
    if not e["skipped"]:
      continue
    total = sum(e["skipped"].values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(e["skipped"].items()))
    lines.append(f"  {name}: {total} skipped ({reasons})")
    lines += [f"    {m}" for m in e["skip_messages"]]
    if total > len(e["skip_messages"]):
      lines.append(f"    ... {total - len(e['skip_messages'])} more ({RESULTS_FILE} has a line for each skipped record; "
                   "lines of the annotation file that are not records are listed under bad_lines in results.json)")
  return "\n".join(["skipped records:"] + lines) if lines else "skipped records: none"


def format_table(summary: dict[str, Any], modes: Sequence[str]) -> str:
  """A fixed-width text table: one row per dataset and mode, the averages, then the skip summary."""
  head = f"{'dataset':<14}{'mode':<7}{'frame':<16}{'images':>7}" + "".join(
      f"{t:>{_CELLS.get(k, (9, 4))[0]}}" for k, t in _COLUMNS)
  lines = [f"protocol: {summary['protocol']}", head, "-" * len(head)]

  def row(name, mode, frame, n, m):
    vals = "".join(_cell(k, m.get(k) if m else None) for k, _ in _COLUMNS)
    return f"{name:<14}{mode:<7}{frame:<16}{n:>7}" + vals

  for name, e in summary["datasets"].items():
    for mode in modes:
      m = e[mode]
      frame = ",".join(f"{k}:{v}" for k, v in m.get("frames", {}).items()) if mode == "sparse" else "-"
      lines.append(row(name, mode, frame or "-", m["images"], m))
  lines.append("-" * len(head))
  for mode in modes:
    a = summary["average"][mode]
    lines.append(row(f"average of {a['datasets'] if a else 0}", mode, summary["protocol"] if mode == "sparse" else "-",
                     a["images"] if a else 0, a))
  return "\n".join(lines + [format_skips(summary)])
