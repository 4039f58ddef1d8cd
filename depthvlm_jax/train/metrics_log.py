"""Run metrics: `metrics.jsonl` and TensorBoard event files (tensorboardX, no TensorFlow) in the workdir.

A resumed run first forgets what the killed run logged after the checkpoint it restarts from: rows
of `metrics.jsonl` with a later step are dropped and TensorBoard is told to purge those steps, so
the files show one curve, the same as an uninterrupted run's.

The workdir may be an object-store prefix (`gs://bucket/run`). Objects cannot be appended to, so
there `metrics.jsonl` is rewritten whole (rows kept in memory) at every row; a local file is appended to.
"""

from __future__ import annotations

import json
import logging
import pathlib
import struct
import time
from typing import Any, Mapping

import tensorboardX
from etils import epath
from tensorboardX.proto import event_pb2


def _scalars(row: Mapping[str, Any], prefix: str) -> dict[str, float]:
  out = {}
  for k, v in row.items():
    if isinstance(v, Mapping):
      out.update(_scalars(v, f"{prefix}/{k}"))
    elif isinstance(v, (bool, int, float)) and k != "step":
      out[f"{prefix}/{k}"] = float(v)
  return out


class MetricsLog:
  """Appends metric rows to `workdir/metrics.jsonl` and `workdir/tensorboard/` (main process only)."""

  def __init__(self, workdir: str | pathlib.Path, resumed_step: int | None, enabled: bool = True):
    self.enabled = enabled
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb_dir = epath.Path(workdir) / "tensorboard"
    self.writer = None
    self._append = "://" not in str(self.path)
    self._rows: list[str] = []  # the whole file, where it is rewritten rather than appended to
    if not enabled:
      return
    if self.path.exists():
      rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
      keep = [r for r in rows if resumed_step is not None and r.get("step", 0) <= resumed_step]
      if len(keep) != len(rows):
        logging.getLogger(__name__).info("dropping %d metric rows logged after step %s", len(rows) - len(keep),
                                         resumed_step)
      self._rows = [json.dumps(r) + "\n" for r in keep]
      self.path.write_text("".join(self._rows))
    purge = resumed_step + 1 if resumed_step is not None else None
    # The default file name has one-second resolution; a quick restart would overwrite the old file.
    self.writer = tensorboardX.SummaryWriter(str(self.tb_dir), purge_step=purge, flush_secs=5,
                                             filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, row: Mapping[str, Any], prefix: str = "train") -> None:
    """One row (nested dicts allowed); numbers go to TensorBoard as `prefix/key[/subkey]`."""
    if not self.enabled:
      return
    line = json.dumps({"step": step, **({"eval": prefix.split("/", 1)[1]} if "/" in prefix else {}), **row}) + "\n"
    if self._append:
      with self.path.open("a") as f:
        f.write(line)
    else:
      self._rows.append(line)
      self.path.write_text("".join(self._rows))
    for tag, value in _scalars(row, prefix).items():
      self.writer.add_scalar(tag, value, step)

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _event_files(folder: epath.Path) -> list[epath.Path]:
  """The event files under `folder`, at any depth, listed folder by folder: on object stores epath
  globs one level at a time (no `**`), and its `walk` yields gs:// folders without their scheme."""
  if not folder.is_dir():
    return []
  found = []
  for p in folder.iterdir():
    if p.name.startswith("events.out.tfevents."):
      found.append(p)
    elif p.is_dir():
      found.extend(_event_files(p))
  return found


def read_event_scalars(logdir: str | pathlib.Path) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from every TensorBoard event file under `logdir`, honouring purges.

  Event files are TFRecord streams (u64 length, u32 crc, payload, u32 crc) of `Event` protos; a
  `SessionLog.START` event at step s discards the earlier-written values with step >= s, as
  TensorBoard does.
  """
  out: dict[str, dict[int, float]] = {}
  for path in sorted(_event_files(epath.Path(logdir))):  # names sort by creation time
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      payload = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(payload)
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        for values in out.values():
          for s in [s for s in values if s >= event.step]:
            del values[s]
      for v in event.summary.value:
        if v.HasField("simple_value"):
          out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out
