"""The train step: stage-1 freezing, accumulation == full batch, the trainer's one-micro-batch-per-call
programs == the one-program step, NaN guard, sharded == unsharded."""

import functools

import jax
import numpy as np
import optax
import pytest

from depthvlm_jax import sharding
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, depthvlm_dummy_inputs, random_params
from depthvlm_jax.model.inputs import make_model_inputs
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.train import optim
from depthvlm_jax.runs import freeze
from depthvlm_jax.train.step import (initial_state, loss_terms, make_train_programs, make_train_step, max_supervised_tokens,
                                     row_counts, supervised_depth_images, zero_accumulator)
from tests.model import hf_reference as ref

GRID = (4, 6)  # patches -> 2x3 tokens -> 64x96 depth
STAGE1 = [("depth_head/.*", True), (".*", False)]
STAGE2 = [("visual/.*", False), ("(language_model|lm_head)/.*", True), ("depth_head/.*", True)]


@pytest.fixture(scope="module")
def setup():
  config = Qwen3VLConfig.tiny(vocab_size=151936)
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  params = random_params(model, seed=0)
  return config, model, params


def make_batch(config, n=4, seed=0):
  rng = np.random.default_rng(seed)
  toks = [ref.build_prompt(rng, config, [GRID], (3, 4 + i)) for i in range(n)]
  b = make_model_inputs(toks, config, [ref.random_image_patches(rng, GRID, config) for _ in range(n)],
                        [GRID] * n, padding_side="right")
  b.pop("rope_deltas")
  labels = np.where(rng.random(b["input_ids"].shape) < 0.3, b["input_ids"], -100)
  b["labels"] = np.where(b["attention_mask"] > 0, labels, -100).astype(np.int32)
  depth = rng.uniform(0.5, 10.0, (n, 64, 96)).astype(np.float32)
  depth[:, :10] = 0.0  # some invalid pixels
  b["depth"] = depth
  b["has_depth"] = np.array([True] * (n - 1) + [False])
  return b


ADAMW = optim.make_optimizer(lambda count: 1e-2, 1.0, 0.0)
SGD = optax.sgd(1.0)  # linear in the gradient: new params compare accumulated gradients


@functools.cache
def jitted_step(model, opt, micro, with_lm, unroll):
  """One jitted step per (model, optimizer, micro-batching): tests with the same settings share its compile."""
  return jax.jit(make_train_step(model, opt, (2, 3), micro, 1.0, with_lm, unroll_micro_batches=unroll))


def run(model, params, rules, batch, micro=1, with_lm=False, steps=1, opt=ADAMW, unroll=None):
  mask = freeze.trainable_mask(params, rules)
  trainable, frozen = freeze.split_params(params, mask)
  state = initial_state(trainable, opt.init(trainable))
  step = jitted_step(model, opt, micro, with_lm, unroll)
  for _ in range(steps):
    state, metrics = step(state, frozen, batch)
  return freeze.merge_params(state["params"], frozen), state, metrics


@pytest.mark.slow
def test_stage1_changes_only_the_depth_head(setup):
  config, model, params = setup
  new, state, m = run(model, params, STAGE1, make_batch(config))
  assert bool(m["finite"]) and float(m["depth_loss"]) > 0 and float(m["depth_images"]) == 3
  before, after = freeze.flatten(params), freeze.flatten(new)
  changed = {p for p in before if not np.array_equal(np.asarray(before[p]), np.asarray(after[p]))}
  assert changed and all(p[0] == "depth_head" for p in changed)
  frozen_paths = [p for p in before if p[0] != "depth_head"]
  assert all(np.array_equal(np.asarray(before[p]), np.asarray(after[p])) for p in frozen_paths)
  # frozen towers carry no optimizer state
  opt_leaves = jax.tree.leaves(state["opt_state"])
  assert sum(x.size for x in opt_leaves) <= 2 * sum(x.size for x in jax.tree.leaves(state["params"])) + 10


@pytest.fixture(scope="module")
def full_batch_sgd_step(setup):
  """One stage-2 SGD step on 4 rows in one pass (sgd is linear in the gradient, so the new params
  compare the accumulated gradients)."""
  config, model, params = setup
  batch = make_batch(config, n=4, seed=1)
  full, _, m1 = run(model, params, STAGE2, batch, 1, with_lm=True, opt=SGD)
  return batch, full, m1


# unroll=True: the Python loop XLA:CPU gets (2 copies of the step); False: the lax.scan accelerators
# get (4 trips of one body)
@pytest.mark.slow
@pytest.mark.parametrize("micro,unroll", [(2, True), (4, False)])
def test_micro_batches_equal_full_batch(setup, full_batch_sgd_step, micro, unroll):
  config, model, params = setup
  batch, full, m1 = full_batch_sgd_step
  acc, _, mk = run(model, params, STAGE2, batch, micro, with_lm=True, opt=SGD, unroll=unroll)
  np.testing.assert_allclose(float(mk["loss"]), float(m1["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def run_programs(model, params, rules, batch, micro, with_lm=False, opt=ADAMW):
  """One update through `make_train_programs` as the trainer runs it: micro-batch i is rows i, i + K, ...
  of the host batch, the denominators counted on the host."""
  mask = freeze.trainable_mask(params, rules)
  trainable, frozen = freeze.split_params(params, mask)
  state = initial_state(trainable, opt.init(trainable))
  accumulate, apply = (jax.jit(f) for f in make_train_programs(model, opt, (2, 3), 1.0, with_lm))
  counts = row_counts(batch, (2, 3), model.config.vision.spatial_merge_size, with_lm)
  acc = zero_accumulator(trainable)
  for i in range(micro):
    micro_batch = {k: v[:, i::micro] if k == "position_ids" else v[i::micro] for k, v in batch.items()}  # (3, B, L)
    acc = accumulate(state, frozen, acc, micro_batch, counts)
  state, metrics = apply(state, frozen, acc)
  return freeze.merge_params(state["params"], frozen), state, metrics


@pytest.mark.slow
@pytest.mark.parametrize("micro", [1, 2])
def test_programs_per_micro_batch_equal_the_one_program_step(setup, full_batch_sgd_step, micro):
  """The trainer's update (one `accumulate` call per micro-batch, then `apply`) gives the update of
  the one-program step over the whole batch."""
  config, model, params = setup
  batch, full, m1 = full_batch_sgd_step
  got, _, mk = run_programs(model, params, STAGE2, batch, micro, with_lm=True, opt=SGD)
  for k in ("loss", "depth_loss", "lm_loss", "depth_images", "lm_tokens"):
    np.testing.assert_allclose(float(mk[k]), float(m1[k]), rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_row_counts_are_the_step_denominators(setup):
  """The host's per-row counts sum to the denominators the one-program step computes on the devices,
  rows without depth, with a grid outside the bucket and with no valid (or only NaN) depth included."""
  config, model, _ = setup
  batch = make_batch(config, n=6, seed=7)
  batch["depth"] = batch["depth"].copy()
  batch["depth"][1] = 0.0  # no valid pixel
  batch["depth"][2] = np.nan  # no valid pixel either
  batch["depth"][3, 40:] = np.nan  # NaN pixels and valid ones
  batch["image_grid_hw"] = np.asarray([GRID] * 6, np.int32)
  batch["image_grid_hw"][4] = (8, 6)  # taller than the bucket's (2, 3) tokens
  counts = row_counts(batch, (2, 3), 2)
  expected = np.asarray(supervised_depth_images({k: jax.numpy.asarray(v) for k, v in batch.items()}, (2, 3), 2))
  np.testing.assert_array_equal(counts["depth"], expected.astype(np.int32))
  assert counts["depth"].tolist() == [1, 0, 0, 1, 0, 0]  # row 5 has no depth (has_depth False)
  np.testing.assert_array_equal(counts["lm"], (batch["labels"][:, 1:] != -100).sum(1))
  assert not row_counts(batch, (2, 3), 2, with_lm=False)["lm"].any()


@pytest.mark.slow
def test_nonfinite_step_is_skipped(setup):
  config, model, params = setup
  batch = make_batch(config, seed=2)
  batch["pixel_values"] = batch["pixel_values"].copy()
  batch["pixel_values"][0, 0, 0] = np.nan
  new, state, m = run(model, params, STAGE1, batch)
  assert not bool(m["finite"]) and int(state["nonfinite"]) == 1 and int(state["skipped_updates"]) == 1
  assert float(m["update_norm"]) == 0.0
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the optimizer state is untouched too: the moments stay zero, the step count at 0
  fresh = ADAMW.init(freeze.split_params(
      params, freeze.trainable_mask(params, STAGE1))[0])
  for a, b in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_update_norm_is_the_applied_change(setup):
  config, model, params = setup
  new, state, m = run(model, params, STAGE1, make_batch(config, seed=4))
  before, after = freeze.flatten(params), freeze.flatten(new)
  change = np.sqrt(sum(np.sum((np.asarray(after[p], np.float64) - np.asarray(before[p], np.float64)) ** 2)
                       for p in before))
  assert bool(m["finite"]) and change > 0
  np.testing.assert_allclose(float(m["update_norm"]), change, rtol=1e-4)


@pytest.mark.slow
def test_nonfinite_update_counts_as_nonfinite(setup):
  """Finite gradients but an infinite learning rate: the update cannot be refused in place, but the
  step is flagged (so the trainer writes no checkpoint from it) without counting as skipped."""
  config, model, params = setup
  _, state, m = run(model, params, STAGE1, make_batch(config, seed=5), opt=optax.sgd(float("inf")))
  assert np.isfinite(float(m["grad_norm"])) and not np.isfinite(float(m["update_norm"]))
  assert not bool(m["finite"]) and int(state["nonfinite"]) == 1 and int(state["skipped_updates"]) == 0


@pytest.mark.slow
def test_sharded_step_equals_unsharded(setup, full_batch_sgd_step):
  """The stage-2 SGD step on a data x fsdp x tensor mesh of 8 devices equals the one-device step
  (SGD: Adam's first step divides by |g| and amplifies rounding in tiny gradients)."""
  config, model, params = setup
  batch, expected, m1 = full_batch_sgd_step
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = abstract_params(model, **depthvlm_dummy_inputs(config), boxed=True)
  sharded_params = jax.device_put(params, sharding.logical_shardings(boxed, mesh))
  sharded_batch = {k: jax.device_put(v, sharding.activation_sharding(
      mesh, *((None, "batch") if k == "position_ids" else ("batch",)), shape=v.shape)) for k, v in batch.items()}
  got, _, m8 = run(model, sharded_params, STAGE2, sharded_batch, with_lm=True, opt=SGD)
  assert len(jax.tree.leaves(got)[0].sharding.device_set) == 8
  np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_lm_head_on_supervised_positions_only_gives_the_same_loss(setup):
  config, model, params = setup
  batch = make_batch(config, n=4, seed=4)
  longest = max_supervised_tokens(batch["labels"])
  terms = jax.jit(lambda p, b, positions: loss_terms(model, p, b, (2, 3), with_lm=True, lm_positions=positions),
                  static_argnums=2)
  full = terms(params, batch, 0)
  gathered = terms(params, batch, longest)
  assert float(full["lm_count"]) == float(gathered["lm_count"]) > 0
  np.testing.assert_allclose(float(gathered["lm_sum"]), float(full["lm_sum"]), rtol=1e-6)
  np.testing.assert_allclose(float(gathered["depth_sum"]), float(full["depth_sum"]), rtol=1e-6)
  # a budget below the longest reply drops tokens (the trainer refuses such batches on the host)
  short = terms(params, batch, longest - 1)
  assert float(short["lm_count"]) < float(full["lm_count"])


def test_uint8_pixels_give_the_same_losses_as_host_patches(setup):
  """A batch of uint8 bucket images (patched inside the step) and the same batch with the host
  processor's rows give identical loss terms and gradients."""
  from depthvlm_jax.processing.device_patches import host_patches
  config, model, params = setup
  batch = make_batch(config, seed=5)
  rng = np.random.default_rng(5)
  pixels = rng.integers(0, 256, (4, 96, 128, 3), dtype=np.uint8)  # a bucket wider and taller than the grid
  grids = np.asarray([GRID] * 4, np.int32)
  host = dict(batch, pixel_values=np.stack([host_patches(p, g) for p, g in zip(pixels, grids)]), image_grid_hw=grids)
  device = {k: v for k, v in host.items() if k != "pixel_values"}
  device["pixels"] = pixels

  def terms(p, b):
    out = loss_terms(model, p, b, (2, 3), with_lm=True)
    return out["depth_sum"] + out["lm_sum"], out

  grad = jax.jit(jax.grad(terms, has_aux=True))
  g_host, t_host = grad(params, host)
  g_dev, t_dev = grad(params, device)
  for k in t_host:
    assert float(t_host[k]) == float(t_dev[k]), k
  for a, b in zip(jax.tree.leaves(g_host), jax.tree.leaves(g_dev)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_depth_codes_give_the_same_losses_as_float_depth(setup):
  """A batch whose depth is uint16 codes with a unit per example (decoded inside the step) and the
  same batch with the host's float32 decoding of those codes give identical loss terms, gradients
  and supervised-image counts."""
  from depthvlm_jax.processing import depth_codes
  from depthvlm_jax.train.step import supervised_depth_images
  config, model, params = setup
  batch = make_batch(config, seed=6)
  rng = np.random.default_rng(6)
  codes = rng.integers(1, 65536, batch["depth"].shape).astype(np.uint16)
  codes[:, :10] = 0  # invalid pixels
  codes[2] = 0  # an image without a valid pixel
  units = np.asarray([1 / 1000, 1 / (256 * 0.987), 1 / 5000, 80 / 65535], np.float32)
  coded = dict(batch, depth=codes, depth_unit=units)
  floats = dict(batch, depth=depth_codes.decode(codes, units))
  assert floats["depth"].dtype == np.float32

  def terms(p, b):
    out = loss_terms(model, p, b, (2, 3), with_lm=False)
    return out["depth_sum"], out

  grad = jax.jit(jax.grad(terms, has_aux=True))
  g_float, t_float = grad(params, floats)
  g_code, t_code = grad(params, coded)
  assert float(t_code["depth_count"]) == 2  # images 0 and 1 (2: no valid pixel, 3: no depth)
  for k in t_float:
    assert float(t_float[k]) == float(t_code[k]), k
  for a, b in zip(jax.tree.leaves(g_float), jax.tree.leaves(g_code)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(jax.jit(depth_codes.batch_depth)(coded), floats["depth"])
  np.testing.assert_array_equal(supervised_depth_images(coded, (2, 3)), supervised_depth_images(floats, (2, 3)))
