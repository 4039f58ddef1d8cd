"""Waiting on the processes of a multi-process test."""

import subprocess
import time


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
  """Waits until every process has exited, one has failed (the others would wait on its collectives
  forever), or `timeout_s` has passed; then kills whatever still runs. Callers assert on returncodes."""
  deadline = time.time() + timeout_s
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
