"""One training run per workdir: a lease object `WORKDIR/lease.json`, held by process 0, naming its holder.

The workdir may be local or an object-store prefix (`gs://bucket/run`), which has no file locks, so
the guard is a lease: a small JSON object with the holder's host, pid, start time, a token unique to
the run and the time it was last refreshed. Process 0 writes it when the run starts, a daemon thread
rewrites it every `refresh_s` seconds, and it is deleted when the run ends. The other processes of
a multi-process run never read or write it.

A launch that finds a lease refreshed less than `stale_after_s` seconds ago is refused with one
line naming the holder. An older lease belongs to a run that died without deleting it (killed, or
its host lost) and is taken over. So is a lease whose holder is on this host and whose pid no
longer exists: a run restarted on the same machine right after a kill does not wait out the stale
time. After writing, the lease is read back: of two launches racing for it, the one whose write
did not stick is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from etils import epath

LEASE_NAME = "lease.json"
STALE_AFTER_S = 300.0  # a lease not refreshed for this long is taken over
REFRESH_S = 30.0  # how often the holder rewrites its lease

log = logging.getLogger(__name__)


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir (message names it)."""


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_lease(workdir: str | pathlib.Path) -> dict[str, Any] | None:
  """The lease in `workdir` (None if there is none or it cannot be parsed)."""
  try:
    info = json.loads((epath.Path(workdir) / LEASE_NAME).read_text())
  except (FileNotFoundError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def _pid_gone_here(info: dict[str, Any]) -> bool:
  """True if the holder ran on this host and its process no longer exists."""
  if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
    return False
  try:
    os.kill(info["pid"], 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # exists, owned by another user
    return False
  return False


def _describe(info: dict[str, Any], age: float) -> str:
  return (f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started')}, lease refreshed "
          f"{age:.0f} s ago)")


class _Lease:

  def __init__(self, path: epath.Path, refresh_s: float):
    self.path = path
    self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "token": uuid.uuid4().hex}
    self.refresh_s = refresh_s
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._refresh_loop, name="workdir-lease", daemon=True)

  def write(self) -> None:
    self.path.write_text(json.dumps(dict(self.info, refreshed=time.time())))

  def ours(self) -> bool:
    return (read_lease(self.path.parent) or {}).get("token") == self.info["token"]

  def _refresh_loop(self) -> None:
    while not self.stop.wait(self.refresh_s):
      try:
        if not self.ours():
          log.error("%s: the workdir lease was taken over by another run (%s); this run no longer holds it",
                    self.path, read_lease(self.path.parent))
          return
        self.write()
      except Exception as e:  # noqa: BLE001 -- a failed refresh is retried at the next period
        log.warning("%s: cannot refresh the workdir lease (%s); retrying in %.0f s", self.path, e, self.refresh_s)


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path, enabled: bool = True, stale_after_s: float = STALE_AFTER_S,
         refresh_s: float = REFRESH_S) -> Iterator[None]:
  """Holds the lease of `workdir` for the body; raises WorkdirLockedError if a live run holds it.

  enabled=False (every process but process 0) touches nothing.
  """
  if not enabled:
    yield
    return
  path = epath.Path(workdir) / LEASE_NAME
  held = read_lease(workdir)
  if held is not None:
    age = time.time() - float(held.get("refreshed", 0))
    if age < stale_after_s and not _pid_gone_here(held):
      raise WorkdirLockedError(f"{workdir}: workdir in use by {_describe(held, age)}; wait for that run to end "
                               f"or stop it (its lease is taken over once {stale_after_s:.0f} s old), or use "
                               f"another --workdir")
    log.warning("%s: taking over the workdir lease of %s, which is gone", workdir, _describe(held, age))
  lease = _Lease(path, refresh_s)
  lease.write()
  if not lease.ours():
    other = read_lease(workdir) or {}
    raise WorkdirLockedError(f"{workdir}: workdir taken at the same moment by {_describe(other, 0)}; use "
                             f"another --workdir")
  lease.thread.start()
  try:
    yield
  finally:
    lease.stop.set()
    lease.thread.join()
    with contextlib.suppress(Exception):  # a lease left behind goes stale and is taken over
      if lease.ours():
        path.unlink()
