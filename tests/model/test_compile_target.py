"""CPU-tuned code paths follow the compile target (`sharding.compile_target`), not the host's backend.

The depth head's hand-written convolution gradients (`cpu_kernels`) and the unrolled micro-batch
loop are for XLA:CPU; a program compiled for a TPU slice from this CPU host must not get them, and
the fused attention kernels are picked the same way (`tests/model/test_attention.py`).
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from depthvlm_jax import sharding
from depthvlm_jax.model import cpu_kernels, layers
from depthvlm_jax.model import depth_head as dh
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.train import step


def _trace_conv_grads(resize_to):
  """Traces (no compile) the gradients of one 3x3 `Conv2d`; the CPU kernels are picked at trace time."""
  conv = dh.Conv2d(4, 3, resize_input_to=resize_to)
  x = jnp.zeros((1, 16, 16, 3), jnp.float32)
  params = jax.eval_shape(conv.init, jax.random.key(0), x)
  jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(conv.apply(p, x) ** 2), argnums=(0, 1)))(params, x)


def test_depth_head_cpu_kernels_only_for_a_cpu_target(monkeypatch):
  used = []
  for name in ("conv3x3", "conv3x3_of_resized"):
    real = getattr(dh, name)
    monkeypatch.setattr(dh, name, lambda *a, real=real, name=name: used.append(name) or real(*a))
  mesh = sharding.make_mesh({"data": -1})  # the host's CPU devices
  for size in (None, (32, 32)):
    sharding.in_mesh(_trace_conv_grads, mesh)(size)
  assert set(used) == {"conv3x3", "conv3x3_of_resized"}
  used.clear()
  monkeypatch.setattr(dh, "compile_target", lambda: "tpu")  # as traced under a TPU slice's mesh
  for size in (None, (32, 32)):
    _trace_conv_grads(size)
  assert used == []  # autodiff's convolutions (equal gradients: tests/model/test_depth_head.py)


def test_micro_batches_unrolled_only_for_a_cpu_target(monkeypatch):
  # The loop structure alone: a one-parameter stand-in for the model's loss terms.
  monkeypatch.setattr(step, "loss_terms", lambda model, params, mb, *a: {
      "depth_sum": jnp.sum(params["w"] * mb["depth"]), "depth_count": jnp.float32(1),
      "lm_sum": jnp.float32(0), "lm_count": jnp.float32(0)})
  model = types.SimpleNamespace(config=Qwen3VLConfig.tiny())
  optimizer = optax.sgd(0.1)
  params = {"w": jnp.ones((4, 4), jnp.float32)}
  b = 4
  batch = dict(labels=jnp.full((b, 8), -100, jnp.int32), position_ids=jnp.zeros((3, b, 8), jnp.int32),
               image_grid_hw=jnp.full((b, 2), 4, jnp.int32), has_depth=jnp.ones((b,), bool),
               depth=jnp.ones((b, 4, 4), jnp.float32))
  state = step.initial_state(params, optimizer.init(params))
  scans = {}
  for platform in ("cpu", "tpu", "gpu"):
    fn = step.make_train_step(model, optimizer, (2, 2), 2, 1.0, with_lm=False, platform=platform)
    scans[platform] = str(jax.make_jaxpr(fn)(state, {}, batch)).count(" scan[")
  assert scans == {"cpu": 0, "tpu": 1, "gpu": 1}


class _DenseStack(nn.Module):
  """Eight bfloat16 layers of 512x512 (1 MiB each as float32)."""

  @nn.compact
  def __call__(self, x):
    for i in range(8):
      x = jnp.tanh(layers.Dense(512, (None, None), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name=f"d{i}")(x))
    return x


def _compiled_stack(monkeypatch, tie: bool):
  if not tie:
    monkeypatch.setattr(cpu_kernels, "weight_after_input", lambda x, kernel: kernel)
  model = _DenseStack()
  x = jnp.ones((4, 512), jnp.bfloat16)
  params = model.init(jax.random.key(0), x)
  compiled = jax.jit(model.apply).lower(params, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled(params, x)


def test_bf16_weights_are_converted_one_layer_at_a_time_on_cpu(monkeypatch):
  """XLA:CPU upcasts bfloat16 matmul weights to float32 copies; tied to their layer's input
  (`cpu_kernels.weight_after_input`) they are not all alive at once. Same values either way."""
  tied_temp, tied = _compiled_stack(monkeypatch, tie=True)
  loose_temp, loose = _compiled_stack(monkeypatch, tie=False)
  f32_weights = 8 * 512 * 512 * 4
  assert loose_temp >= f32_weights, loose_temp  # the untied program holds every float32 copy at once
  assert tied_temp <= f32_weights / 3, tied_temp
  assert jnp.array_equal(tied, loose)


def test_the_weight_tie_is_only_for_one_device_cpu_programs(monkeypatch):
  calls = []
  monkeypatch.setattr(cpu_kernels, "weight_after_input", lambda x, kernel: calls.append(1) or kernel)
  model = _DenseStack()
  x = jnp.ones((8, 512), jnp.bfloat16)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  trace = lambda: jax.make_jaxpr(lambda p, x: model.apply(p, x))  # a new function each time: no cached trace
  calls.clear()
  trace()(params, x)
  assert len(calls) == 8
  calls.clear()
  sharding.in_mesh(trace(), sharding.make_mesh({"data": -1}))(params, x)  # 8 CPU devices
  assert not calls
  trace()(params, x)
  assert len(calls) == 8  # one device again
  calls.clear()
  monkeypatch.setattr(layers, "compile_target", lambda: "tpu")
  trace()(params, x)
  assert not calls


def test_attention_query_chunks_only_on_cpu(monkeypatch):
  """The XLA form runs in query chunks past `layers.MAX_LOGITS_BYTES` on XLA:CPU only (4096 queries,
  16 heads: 1 GiB of float32 logits); a TPU program keeps one call (no loop hidden from its cost model)."""
  q = k = v = jax.ShapeDtypeStruct((1, 4096, 16, 64), jnp.float32)
  def traced():  # a new function each time: no cached trace
    return str(jax.make_jaxpr(lambda q, k, v: layers.attention(q, k, v, None, impl="xla"))(q, k, v))
  assert "scan[" in traced()
  monkeypatch.setattr(layers, "compile_target", lambda: "tpu")
  assert "scan[" not in traced()


@pytest.mark.slow
def test_resize_is_a_matmul_without_loops_on_tpu():
  """Compiled for a TPU chip, the bilinear resize's gathers of a large map (here 126 MB, as the depth
  head's at 768x1024; smaller ones stay gathers) become while loops, one trip per output row, counted
  once by the cost model; the TPU form (`resize._resize_axis_matmul`) has none and is cheaper by the
  compiler's own figures. Values: `test_resize_matches_torch[tpu]`."""
  import numpy as np
  pytest.importorskip("libtpu")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from depthvlm_jax import aot
  from depthvlm_jax.model import resize
  mesh = Mesh(np.array(aot.topology_devices("v5e:2x2")[:1]), ("data",))
  x = jax.ShapeDtypeStruct((10, 192, 256, 128), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
  compiled = {}
  for target in ("cpu", "tpu"):  # the gather form, forced into a TPU program; then the TPU's own choice
    def loss(a):  # a new function each time: no cached trace
      return jnp.sum(resize.resize_bilinear_align_corners(a, (384, 512)).astype(jnp.float32) ** 2)
    patched = (lambda: "cpu") if target == "cpu" else sharding.compile_target
    original, resize.compile_target = resize.compile_target, patched
    try:
      compiled[target] = jax.jit(sharding.in_mesh(jax.grad(loss), mesh)).lower(x).compile()
    finally:
      resize.compile_target = original
  loops = {t: c.as_text().count(" while(") for t, c in compiled.items()}
  assert loops["cpu"] > 0 and loops["tpu"] == 0, loops
  bytes_ = {t: c.cost_analysis()["bytes accessed"] for t, c in compiled.items()}
  assert bytes_["tpu"] < bytes_["cpu"], bytes_


def test_position_embedding_gathers_stay_on_the_chips_of_their_images():
  """The vision tower's interpolated position embedding on an FSDP mesh (the table sharded along its
  channels): each chip gathers for its own images, after one all-gather of the small table, with no
  transpose (all-to-all) of the whole batch's rows."""
  import numpy as np
  pytest.importorskip("libtpu")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from depthvlm_jax import aot
  from depthvlm_jax.model import vision
  mesh = Mesh(np.array(aot.topology_devices("v5p:2x2x2")).reshape(1, 8), ("data", "fsdp"))
  n, p, c, side = 16, 256, 128, 16
  table = jax.ShapeDtypeStruct((side * side, c), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp")))
  grid = jax.ShapeDtypeStruct((n, 2), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
  def embed(table, grid):
    row, col, _ = vision.patch_coordinates(grid, p, 2)
    return vision.interpolated_position_embedding(table, row, col, grid, side)
  compiled = jax.jit(sharding.in_mesh(embed, mesh)).lower(table, grid).compile()
  assert aot.collective_stats(compiled.as_text()) == {"all-gather": {"count": 1, "bytes": side * side * c * 4}}
  assert compiled.output_shardings.shard_shape((n, p, c)) == (n // 8, p, c)
