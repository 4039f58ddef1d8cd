"""Two processes build the training data together (see `tests/train/two_process_data.py`).

Each of two JAX processes (gloo on CPU) parses and sizes only its half of an annotation's records,
some of them sized from their image headers; they exchange the sizes, get the same bucket weights
and the same bucket at every step, and their rows of every global batch are together exactly the
rows of the single-process batch built here.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from PIL import Image

from depthvlm_jax.train import distributed
from tests.train import two_process_data as script
from tests.train.processes import wait_all

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEADLINE_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _annotation(root: pathlib.Path, name: str, header_sized: int) -> list[int]:
  """40 records: landscape and portrait sizes from the annotation, the last `header_sized` of them
  sized from their image headers (no size in the annotation). Returns each record's line number
  (there are blank lines in between)."""
  lines = []
  for i in range(40):
    w, h = (130, 95) if i % 3 else (95, 130)
    if i < 40 - header_sized:
      lines.append({"image": f"{name}{i}.png", "canonical_size": [w, h]})
    else:
      Image.new("RGB", (w // 2, h // 2)).save(root / f"{name}{i}.png")
      lines.append({"image": f"{name}{i}.png", "original_fx": 500.0, "canonical_fx": 1000.0})
  text, numbers = "", []
  for i, line in enumerate(lines):
    if i % 10 == 5:
      text += "\n"  # a blank line: not a record
    text += json.dumps(line) + "\n"
    numbers.append(text.count("\n"))
  (root / f"{name}.jsonl").write_text(text)
  return numbers


@pytest.mark.slow
def test_two_processes_size_half_each_and_load_the_single_process_batches(tmp_path):
  numbers = {"a": _annotation(tmp_path, "a", 0), "b": _annotation(tmp_path, "b", 8)}
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=str(ROOT))
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.train.two_process_data", str(tmp_path), str(port), str(i)],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
           for i, log in enumerate(logs)]
  try:  # the reference meanwhile: one process, every record, the global batch
    single = {name: script.build(tmp_path, name, (0, 1), None) for name in numbers}
    want = {name: script.draw(ds, 2 * script.LOCAL_BATCH, script.STEPS) for name, ds in single.items()}
  finally:
    wait_all(procs, DEADLINE_S)
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
  got = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
  for name in numbers:
    assert len(single[name].weights) == 2 and sum(single[name].weights) == pytest.approx(40)
    for i, g in enumerate(got):
      # this process parsed its half of the records (record k with k % 2 == i), those only
      assert g[name]["parsed_lines"] == [n for k, n in enumerate(numbers[name]) if k % 2 == i], name
      # the same weights as one process with every record: the header-sized records' sample included
      assert g[name]["weights"] == [float(w) for w in single[name].weights], name
    for t, w in enumerate(want[name]):
      assert got[0][name]["steps"][t]["h"] == got[1][name]["steps"][t]["h"] == w["h"], (name, t)  # same bucket
    # each process kept the sizes of its own records only
    assert sorted(p.name.split("-")[-1] for p in (tmp_path / f"cache_{name}_2").glob("sizes-*.npy")) == [
        "shard0of2.npy", "shard1of2.npy"]
  # with every size in the annotation, the two processes' rows of each global batch are the
  # single-process batch's rows (with header-sized records, whose streams drop the records of other
  # buckets when drawn, each process's rows can shift, as a skipped sample shifts them)
  for t, w in enumerate(want["a"]):
    assert sorted(got[0]["a"]["steps"][t]["images"] + got[1]["a"]["steps"][t]["images"]) == sorted(w["images"]), t


def test_shard_gather_in_one_process():
  import numpy as np
  x = np.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(distributed.shard_gather(x, distributed.DataShard(0, 1, 4)), x[None])
