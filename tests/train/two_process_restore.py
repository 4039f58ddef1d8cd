"""`python -m tests.train.two_process_restore RUN1 RUN2 PORT PROCESS_ID`: one of the two processes of
`test_two_process_restore.py`.

With 2 CPU devices of its own, the process joins a 2-process JAX run (4 devices) and starts a
stage-2 run in RUN2 from the stage-1 run in RUN1 (`model_init`) on an fsdp=4 mesh spanning both
processes, through the trainer's own `restore_or_initialise`. It then saves a step of that run and
restores it again (the run's own checkpoint). Every array is compared shard by shard with the
values the test wrote (recomputed here from the same seed). Prints "OK <process id>" at the end.
"""

import sys

from depthvlm_jax.train import distributed

PROCESSES = 2


def expected_params(model, trainable_in_stage1):
  """The stage-1 run's parameters as the test wrote them: random_params(seed 0), frozen ones in bf16."""
  import jax.numpy as jnp
  from depthvlm_jax.model.depthvlm import random_params
  from depthvlm_jax.runs import freeze
  flat = freeze.flatten(random_params(model, seed=0))
  return {p: v if trainable_in_stage1[p] else v.astype(jnp.bfloat16) for p, v in flat.items()}


def check_shards(tree, like, want) -> int:
  """Asserts every array of `tree` has the sharding and dtype of `like` and holds `want` (flat host
  arrays, cast to the target dtype) in each of this process's shards; returns how many arrays span
  devices of the other process (not fully addressable here)."""
  import numpy as np
  from depthvlm_jax.runs import freeze
  got, target = freeze.flatten(tree), freeze.flatten(like)
  assert set(got) == set(target), sorted(set(got) ^ set(target))[:5]
  spanning = 0
  for path, x in got.items():
    assert x.sharding == target[path].sharding, (path, x.sharding, target[path].sharding)
    assert x.dtype == target[path].dtype, (path, x.dtype, target[path].dtype)
    spanning += not x.is_fully_addressable
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want[path]).astype(x.dtype)[shard.index],
                                    err_msg="/".join(path))
  return spanning


def main(run1: str, run2: str, port: str, process_id: str) -> None:
  import pathlib

  distributed.initialize(f"localhost:{port}", PROCESSES, int(process_id))
  import jax
  import numpy as np

  from configs import stage1, stage2
  from depthvlm_jax import sharding
  from depthvlm_jax.runs import checkpoints, freeze, model_from_config
  from depthvlm_jax.train import config_checks, model_state, optim

  assert jax.process_count() == PROCESSES and jax.device_count() == 2 * PROCESSES

  def refuse(*args, **kwargs):
    raise AssertionError("a restore built random parameters or went through the host")

  sharding.place_params = refuse  # the host round trip of earlier versions
  model_state.depth_head_init = refuse  # nothing random when restoring
  config = stage2.get_config().unlock()
  config.model_init = run1
  config.model.frozen_dtype = "bfloat16"
  config.mesh = {"data": 1, "fsdp": 2 * PROCESSES, "tensor": 1}
  mesh = config_checks.make_mesh(config)
  model = model_from_config.build_model(config)
  optimizer = optim.make_optimizer(lambda count: 1e-3, 1.0, 0.0)
  like, mask = model_from_config.params_like(config, model, mesh)
  stage1_mask = freeze.trainable_mask(freeze.unflatten({p: 0 for p in mask}), stage1.get_config().train.trainable)
  want = expected_params(model, stage1_mask)

  # a new stage-2 run from the stage-1 checkpoint
  workdir = pathlib.Path(run2)
  start, state, frozen, mgr = model_state.restore_or_initialise(config, model, mesh, workdir, optimizer, None)
  assert start is None
  spanning = check_shards(freeze.merge_params(state["params"], frozen), like, want)
  assert spanning > 0  # arrays shared by both processes: no process could hold them alone
  assert (workdir / checkpoints.FROZEN_DIR).is_dir()
  # one step of the run saved (train state only) and restored, as a resumed run does
  checkpoints.save(mgr, 1, state, None, None)
  mgr.wait_until_finished()
  step_dir = workdir / "checkpoints" / "1"
  assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == ["state"]
  model_state.initial_params = refuse
  start, restored, frozen2, _ = model_state.restore_or_initialise(config, model, mesh, workdir, optimizer, None)
  assert start == 1
  check_shards(freeze.merge_params(restored["params"], frozen2), like, want)
  opt_like = checkpoints.optimizer_state_like(optimizer, freeze.split_params(like, mask)[0], mesh)
  for x, target in zip(jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(opt_like), strict=True):
    assert x.sharding == target.sharding and x.dtype == target.dtype
    for shard in x.addressable_shards:  # a new run's optimizer state: zero moments and count
      assert not np.asarray(shard.data).any()
  print(f"OK {process_id}: {spanning} arrays span both processes", flush=True)
  distributed.barrier("done")


if __name__ == "__main__":
  main(*sys.argv[1:5])
