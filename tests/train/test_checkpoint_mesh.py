"""A checkpoint written on a data×fsdp×tensor = 2×2×2 mesh restores onto other meshes, values identical."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthvlm_jax import sharding
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, depthvlm_dummy_inputs, random_params
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.train import optim
from depthvlm_jax.runs import checkpoints, freeze
from depthvlm_jax.train import model_state

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this file out

STAGE2 = [("visual/.*", False), ("(language_model|lm_head)/.*", True), ("depth_head/.*", True)]
MODEL = DepthVLM(Qwen3VLConfig.tiny(vocab_size=512), head=DepthHeadConfig.tiny())
OPT = optim.make_optimizer(lambda c: 1e-3, 1.0, 0.0)


def param_shardings(mesh):
  boxed = abstract_params(MODEL, **depthvlm_dummy_inputs(MODEL.config), boxed=True)
  return nn.unbox(boxed), sharding.logical_shardings(boxed, mesh)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(directory, state, frozen) of a checkpoint written from the 2x2x2 mesh."""
  assert jax.device_count() >= 8
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, shardings = param_shardings(mesh)
  params = jax.device_put(random_params(MODEL, seed=1), shardings)
  trainable, frozen = freeze.split_params(params, freeze.trainable_mask(params, STAGE2))

  @jax.jit
  def moments(p):  # non-trivial optimizer moments: one update with a pseudo-gradient
    return OPT.update(jax.tree.map(lambda x: jnp.sin(3.0 * x), p), OPT.init(p), p)[1]

  state = {"step": jnp.asarray(7, jnp.int32), "params": trainable, "opt_state": moments(trainable),
           "nonfinite": jnp.zeros((), jnp.int32), "skipped_updates": jnp.asarray(2, jnp.int32)}
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
  directory = tmp_path_factory.mktemp("ckpt")
  mgr = checkpoints.manager(directory, keep=2)
  checkpoints.save(mgr, 7, state, frozen, None)
  mgr.wait_until_finished()
  mgr.close()
  return directory, state, frozen


@pytest.mark.slow
@pytest.mark.parametrize("target", [{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 1, "fsdp": 1, "tensor": 1}])
def test_restore_onto_another_mesh(saved, target):
  directory, state, frozen = saved
  devices = jax.devices()[:int(np.prod(list(target.values())))]
  mesh = sharding.make_mesh(target, devices=devices)
  shapes, shardings = param_shardings(mesh)
  like = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  like_train, like_frozen = freeze.split_params(like, freeze.trainable_mask(shapes, STAGE2))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  like_state = {"step": scalar, "params": like_train, "opt_state": checkpoints.optimizer_state_like(OPT, like_train, mesh),
                "nonfinite": scalar, "skipped_updates": scalar}
  mgr = checkpoints.manager(directory, keep=2)
  got_state, got_frozen = checkpoints.restore(mgr, mgr.latest_step(), like_state, like_frozen, None)
  for want, got, target_leaf in zip(jax.tree.leaves((state, frozen)), jax.tree.leaves((got_state, got_frozen)),
                                    jax.tree.leaves((like_state, like_frozen))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.is_equivalent_to(target_leaf.sharding, got.ndim)  # placed as the target mesh asks
  assert {d for x in jax.tree.leaves(got_state) for d in x.sharding.device_set} == set(devices)
  if len(devices) == 8:  # FSDP-sharded moments stay sharded
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(got_state["opt_state"]))


def _like(model, mesh, dtype=None):
  boxed = abstract_params(model, **depthvlm_dummy_inputs(model.config), boxed=True)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sh), nn.unbox(boxed),
                      sharding.logical_shardings(boxed, mesh))


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_model_init_restores_another_runs_params_onto_this_mesh(saved, tmp_path, dtype):
  """`model_init` (stage 2 from stage 1): the other run's latest params, read straight into the
  target shardings and dtypes (here from a step that holds its own frozen params, as earlier
  versions wrote them)."""
  import ml_collections
  from depthvlm_jax.model.config import ConfigError

  directory, state, frozen = saved
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").symlink_to(directory)
  config = ml_collections.ConfigDict({"model_init": str(tmp_path / "run"), "model": {"hf_dir": ""}})
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, devices=jax.devices()[:4])
  like = _like(MODEL, mesh, dtype)
  params = model_state.initial_params(config, MODEL, like, jax.random.key(0))
  want = freeze.flatten(freeze.merge_params(state["params"], frozen))
  got, target = freeze.flatten(params), freeze.flatten(like)
  assert set(got) == set(want)
  for path, value in got.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]).astype(target[path].dtype))
    assert value.sharding == target[path].sharding and value.dtype == target[path].dtype
  other = DepthVLM(Qwen3VLConfig.tiny(vocab_size=512, tie_word_embeddings=True), head=DepthHeadConfig.tiny())
  with pytest.raises(ConfigError, match="model_init=.*does not match this model.*lm_head"):
    model_state.initial_params(config, other, _like(other, mesh), jax.random.key(0))


def test_resume_from_steps_of_an_earlier_version_writes_the_frozen_params_once(saved, tmp_path):
  """A workdir whose steps hold their own frozen params (earlier versions) resumes, and the frozen
  params are then written to `frozen_params`, which the run's new steps (state only) rely on."""
  import shutil
  import ml_collections

  directory, state, frozen = saved
  workdir = tmp_path / "run"
  shutil.copytree(directory, workdir / "checkpoints")
  config = ml_collections.ConfigDict({"train": {"trainable": STAGE2, "seed": 0}, "model": {"frozen_dtype": "float32"},
                                      "keep_ckpts": 2, "resume": "", "model_init": ""})
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  start, got_state, got_frozen, mgr = model_state.restore_or_initialise(config, MODEL, mesh, workdir, OPT, None)
  assert start == 7
  for want, got in zip(jax.tree.leaves((state, frozen)), jax.tree.leaves((got_state, got_frozen)), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert (workdir / checkpoints.FROZEN_DIR).is_dir()
  again = checkpoints.restore_frozen(workdir / "checkpoints", got_frozen)
  for want, got in zip(jax.tree.leaves(frozen), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
