"""Failures found by one process are decided on every process (see `tests/train/two_process_decisions.py`).

Two JAX processes (gloo) meet a checkpoint step that fails to restore on one of them, a data source
exhausted on one, and a reply over the label budget on one. Both fall back to the same step, both
raise the same errors, and the run stops on both within STOP_S seconds of the failing batch, with
one error line, printed by process 0, naming the process and host that found it. A hang (one
process left waiting in a collective) fails the test at its deadline.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STOP_S = 60  # from the over-budget batch to both processes exiting
DEADLINE_S = 300  # the whole two-process script, start-up included


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_one_process_failures_stop_or_redirect_both(tmp_path):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=str(ROOT))
  logs = [(tmp_path / f"process_{i}.out", tmp_path / f"process_{i}.err") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.train.two_process_decisions", str(tmp_path / "ckpt"),
                             str(port), str(i)], cwd=ROOT, env=env, stdout=out.open("w"), stderr=err.open("w"))
           for i, (out, err) in enumerate(logs)]
  deadline = time.time() + DEADLINE_S
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      time.sleep(0.2)
    ended = time.time()
  finally:
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = [out.read_text() for out, _ in logs]
  errs = [err.read_text() for _, err in logs]
  assert not hung, f"process(es) {hung} still running after {DEADLINE_S} s:\n" + "\n".join(
      o[-2000:] + e[-2000:] for o, e in zip(outs, errs))
  for i, out in enumerate(outs):
    assert "FELL BACK 1" in out and f"EXHAUSTED {i}" in out, out + errs[i][-3000:]
  assert [p.returncode for p in procs] == [1, 1], errs
  decided = min(float(line.split()[1]) for out in outs for line in out.splitlines() if line.startswith("DECIDING"))
  assert ended - decided < STOP_S
  error_lines = [[l for l in e.splitlines() if l.startswith("error:")] for e in errs]
  assert len(error_lines[0]) == 1 and error_lines[1] == [], error_lines
  line = error_lines[0][0]
  assert "step 5: a sample supervises 7 reply tokens but train.lm_positions=4" in line
  assert f"(process 1, host {socket.gethostname()})" in line
