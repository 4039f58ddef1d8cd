"""The workdir lease: a live holder refuses a second run, a stale or dead one is taken over, the holder refreshes it."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from depthvlm_jax.train import workdir_lock


def write_lease(workdir, host, pid, age_s):
  (workdir / workdir_lock.LEASE_NAME).write_text(json.dumps(
      {"host": host, "pid": pid, "started": "2026-01-01T00:00:00+00:00", "token": "other",
       "refreshed": time.time() - age_s}))


def test_live_lease_of_another_host_is_refused_naming_it(tmp_path):
  write_lease(tmp_path, "pod-worker-0", 4242, age_s=10)
  with pytest.raises(workdir_lock.WorkdirLockedError) as e:
    with workdir_lock.hold(tmp_path, stale_after_s=60):
      pytest.fail("the body must not run")
  msg = str(e.value)
  assert "\n" not in msg and "pid 4242 on host pod-worker-0" in msg and "in use" in msg
  assert workdir_lock.read_lease(tmp_path)["token"] == "other"  # untouched


def test_stale_lease_is_taken_over_and_removed_at_the_end(tmp_path):
  write_lease(tmp_path, "pod-worker-0", 4242, age_s=120)
  with workdir_lock.hold(tmp_path, stale_after_s=60):
    lease = workdir_lock.read_lease(tmp_path)
    assert lease["pid"] == os.getpid() and lease["host"] == socket.gethostname() and lease["token"] != "other"
  assert not (tmp_path / workdir_lock.LEASE_NAME).exists()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  write_lease(tmp_path, socket.gethostname(), int(proc.stdout), age_s=0)
  with workdir_lock.hold(tmp_path):
    assert workdir_lock.read_lease(tmp_path)["pid"] == os.getpid()


def test_holder_refreshes_its_lease(tmp_path):
  with workdir_lock.hold(tmp_path, refresh_s=0.05):
    first = workdir_lock.read_lease(tmp_path)["refreshed"]
    deadline = time.time() + 10
    while workdir_lock.read_lease(tmp_path)["refreshed"] == first:
      assert time.time() < deadline, "the lease was never refreshed"
      time.sleep(0.02)


def test_other_processes_never_touch_the_lease(tmp_path):
  write_lease(tmp_path, "pod-worker-0", 4242, age_s=10)
  before = (tmp_path / workdir_lock.LEASE_NAME).read_text()
  with workdir_lock.hold(tmp_path, enabled=False):
    pass
  assert (tmp_path / workdir_lock.LEASE_NAME).read_text() == before
