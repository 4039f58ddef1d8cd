"""One training run per workdir: an exclusive `flock` on `WORKDIR/.lock`, naming its holder.

The lock file holds `pid`, `host` and the start time of the run that owns it. The kernel drops the
lock when that process ends in any way (also SIGKILL), so a stale file never blocks a later run: the
next run simply takes the lock and rewrites the file. A second run on the same workdir is refused at
once with the holder's pid and host. (Multi-process runs take it on process 0 only; on a shared
filesystem `flock` needs working locks, which NFSv4 and Lustre provide.)
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
from typing import Iterator

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another process holds the workdir (message names it)."""


def _holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info:
    return "another process"
  return f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started')})"


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path, enabled: bool = True) -> Iterator[None]:
  """Holds the exclusive lock of `workdir` for the body; raises WorkdirLockedError if taken."""
  if not enabled:
    yield
    return
  path = pathlib.Path(workdir) / LOCK_NAME
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLockedError(f"{pathlib.Path(workdir)}: workdir in use by {_holder(fd)}; wait for that run to "
                               f"end or stop it, or use another --workdir") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
