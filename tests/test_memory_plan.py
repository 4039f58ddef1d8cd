"""The memory plan's figures against what XLA and the sharding rules actually do, on the tiny config.

The plan derives bytes from abstract traces (eval_shape of init, optimizer init, vjp residuals); here
the same train step the trainer runs is compiled for one CPU device and its buffer assignment
(`compiled.memory_analysis()`) is the measurement:
  * arguments (trainable params + AdamW state + frozen params + batch) vs plan params + opt + batch;
  * temporaries (everything the step allocates: fp32 gradients, saved activations, bf16/f32 weight
    copies, attention/logit working set) vs plan grads + activations + weight residuals + transient;
  * the peak (arguments + outputs - donated aliases + temporaries) vs the plan's total.
Per-device parameter bytes under a mesh are checked against JAX's own shard shapes on 8 devices.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthvlm_jax import memory_plan as mp
from depthvlm_jax import sharding
from depthvlm_jax.model.hf_params import flatten
from depthvlm_jax.train import optim
from depthvlm_jax.train.step import make_train_step

IMAGE, SEQ, BATCH = (192, 256), 128, 2  # a 6x8-token bucket: activations are a large share of the step


@pytest.fixture(scope="module")
def stage2():
  config = mp.stage_config(2, "default")
  return config, mp.param_plan(config)


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_plan_matches_compiled_train_step_memory(stage2):
  config, pp = stage2
  cost = mp.step_cost(pp, config, IMAGE, SEQ, BATCH)
  one = {"data": 1, "fsdp": 1, "tensor": 1}
  # one micro-batch: one fp32 gradient buffer (no accumulator)
  plan = mp.total_bytes(mp.state_bytes_per_device(pp, one, accumulate=False), cost, one, BATCH, BATCH)
  batch = mp.batch_shapes(pp.model.config, IMAGE, SEQ, BATCH)

  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  state = {"step": scalar, "params": pp.trainable, "opt_state": pp.opt_state, "nonfinite": scalar,
           "skipped_updates": scalar}
  opt = optim.make_optimizer(lambda s: 1e-4, config.train.grad_clip, config.train.weight_decay)
  step = make_train_step(pp.model, opt, (IMAGE[0] // 32, IMAGE[1] // 32), 1, config.train.depth_loss_weight,
                         with_lm=True, lm_positions=mp.lm_positions(config))
  m = jax.jit(step, donate_argnums=(0,)).lower(state, pp.frozen, batch).compile().memory_analysis()

  # the plan's optimizer state is optax's own (eval_shape of init): arguments agree to the byte
  # up to the few scalars of the state dict
  planned_args = plan["params"] + plan["opt"] + _bytes(batch)
  assert abs(m.argument_size_in_bytes - planned_args) <= 64, (m.argument_size_in_bytes, planned_args)
  # what the step allocates: grads + saved activations + weight copies + working set
  planned_temp = plan["grads"] + plan["activations"] + plan["weight_residuals"] + plan["transient"]
  assert plan["activations"] > 0.15 * planned_temp  # the activation model carries real weight here
  assert abs(m.temp_size_in_bytes / planned_temp - 1) < 0.2, (m.temp_size_in_bytes, planned_temp)
  measured_peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  planned_peak = sum(plan.values()) + _bytes(batch)
  assert abs(measured_peak / planned_peak - 1) < 0.2, (measured_peak, planned_peak)


def test_per_device_state_bytes_follow_the_sharding_rules(stage2):
  """Plan arithmetic (rules + divisibility) == JAX shard shapes of the trainer's shardings, 8 devices."""
  _, pp = stage2
  assert jax.device_count() >= 8
  for shape in ({"data": 1, "fsdp": 8, "tensor": 1}, {"data": 1, "fsdp": 2, "tensor": 4}):
    mesh = sharding.make_mesh(shape, jax.devices()[:8])
    shardings = flatten(sharding.logical_shardings(pp.boxed, mesh))
    params = flatten(nn.unbox(pp.boxed))
    local = {p: math.prod(shardings[p].shard_shape(x.shape)) for p, x in params.items()}
    want_params = sum(local[p] * np.dtype(x.dtype).itemsize for p, x in params.items())
    want_grads = sum(2 * 4 * local[p] for p in params if pp.mask[p])  # accumulator + fresh gradient
    got = mp.state_bytes_per_device(pp, shape)
    assert got["params"] == want_params and got["grads"] == want_grads
    assert 2 * mp.state_bytes_per_device(pp, shape, accumulate=False)["grads"] == want_grads
    # AdamW: two fp32 moments per trainable parameter (+ step counters)
    assert 0 <= got["opt"] - want_grads <= 64
    replicated = mp.state_bytes_per_device(pp, {"data": 1, "fsdp": 1, "tensor": 1})
    assert got["params"] < replicated["params"] / 2
