"""`python -m tests.train.two_process_decisions CKPT_DIR PORT PROCESS_ID`: one of the two processes of
`test_two_process_decisions.py`.

Joins a 2-process JAX run (gloo on CPU) and meets three failures that only one process finds:
  1. a checkpoint step that fails to restore on process 1 alone (its read raises there): both
     processes fall back to the same older step;
  2. a data source exhausted on process 0 alone (its iterator raises `SourceExhaustedError`): both
     raise it, naming process 0;
  3. last, a batch on process 1 alone whose reply exceeds `train.lm_positions`: both stop, inside
     the CLIs' error reporting, and only process 0 prints the error (naming process 1).
Prints "FELL BACK <step>" and "EXHAUSTED <process>" lines on the way.
"""

import sys
import time

from depthvlm_jax.train import distributed

PROCESSES = 2
LM_POSITIONS = 4


def main(ckpt_dir: str, port: str, process_id: str) -> None:
  distributed.initialize(f"localhost:{port}", PROCESSES, int(process_id))
  import jax
  import ml_collections
  import numpy as np

  from data_pipelines.skips import SourceExhaustedError
  from depthvlm_jax import cli
  from depthvlm_jax.runs import checkpoints
  from depthvlm_jax.train import trainer

  me = jax.process_index()
  assert jax.process_count() == PROCESSES

  # 1. steps 1 and 2 written together; step 2's read fails on process 1 only
  mgr = checkpoints.manager(ckpt_dir, keep=5, async_save=False)
  for step in (1, 2):
    checkpoints.save(mgr, step, {"x": np.full(4, step, np.int32)}, None, None)
  mgr.wait_until_finished()

  def read(step):
    if me == 1 and step == 2:
      raise OSError("transient read error")
    return step

  step, out, damaged = checkpoints._newest_intact(mgr, read)
  assert (step, out, damaged) == (1, 1, [2]), (step, out, damaged)
  print(f"FELL BACK {step}", flush=True)

  # 2. process 0's source is exhausted, process 1's is fine
  config = ml_collections.ConfigDict({"stage": 2, "train": {"lm_positions": LM_POSITIONS}})
  ok_labels = np.full((2, 8), -100, np.int32)
  ok_labels[:, 1:3] = 7  # two supervised tokens: within the budget

  def exhausted():
    raise SourceExhaustedError("data/bad.jsonl: the first 200 samples drawn from this source were all skipped")
    yield

  data = exhausted() if me == 0 else iter([{"labels": ok_labels}])
  try:
    trainer.next_batch(data, config, 1)
    raise AssertionError("no process stopped")
  except SourceExhaustedError as e:
    assert "data/bad.jsonl" in str(e) and "(process 0, host " in str(e), e
    print(f"EXHAUSTED {me}", flush=True)

  # 3. process 1 holds a reply over the budget
  long_labels = ok_labels.copy()
  long_labels[1, 1:] = 7  # seven supervised tokens
  data = iter([{"labels": long_labels if me == 1 else ok_labels}])
  print(f"DECIDING {time.time()}", flush=True)
  with cli.user_errors(0), distributed.reported_by_main():
    trainer.next_batch(data, config, 5)
  raise AssertionError("no process stopped")


if __name__ == "__main__":
  main(*sys.argv[1:4])
