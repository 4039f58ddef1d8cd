"""The train step as the paper presets compile it for an accelerator equals the plain one-device step.

The other step tests run the unscanned float32 model without a mesh: the program XLA:CPU gets.
Here one optimizer step of stage 2 (vision tower frozen; decoder, tied LM head and depth head
trained on the depth and LM losses) is run as
  (a) the reference: the unscanned float32 model, no rematerialisation, no mesh (one device), one
      micro-batch, the CPU program (`make_train_step(..., platform="cpu")` under `jax.jit`);
  (b) the paper program, from the paper_4b preset's stage-2 config: each tower's repeated blocks in
      one `lax.scan`, remat policy `nothing_saveable`, the frozen tower stored in bfloat16
      (`model.frozen_dtype`), two interleaved micro-batches accumulated in float32, parameters
      FSDP-sharded over the 8-device mesh of the trainer's `config_checks.make_mesh`, jitted by the
      trainer's `model_state.jit_train_programs` (`accumulate` once per micro-batch, then `apply`, as
      the trainer runs an update) and traced for a TPU (`target="tpu"`), run on the 8 CPU devices;
      with the preset's bfloat16 compute, and once with float32 compute;
on one batch of 16 from the input pipeline (synthetic RGB-D scenes, the fixed reply as LM labels,
bucket 96x128). Both start from the same values: the frozen tower is the bfloat16 rounding of
random float32 weights and (a) reads those rounded values in float32, so only the compute differs.
The backbone is small, with every tower matrix split over the 8 devices (dims divisible by 8) and
2 blocks in each scanned run (vision blocks 2-3 after DeepStack taps 0, 1; decoder layers 3-4
after the 3 DeepStack layers), embeddings tied as in the 4B.

Stage 1 runs a subset of this program (the frozen decoder's forward, the head's backward, no LM
term) and passes as well (measured: worst leaf 2.7e-2 with bfloat16 compute); it is left out for
time (another 35 s of compiling).

Switches decided by the compile target (`sharding.compile_target`) and what (b) runs:
  * the blocks of each tower: one `lax.scan` in (b), unrolled in (a) (asserted:
    while loops in (b), none in (a));
  * 3x3 convolutions of the depth head (`depth_head.Conv2d`): autodiff's gradients, not the XLA:CPU
    kernels of `cpu_kernels` (asserted from the source locations of the lowered programs: (a)
    calls them, (b) does not);
  * bilinear resize (`resize._resize_axis`): the TPU form, a matmul with the interpolation matrix
    (asserted likewise);
  * weight tie of one-device CPU programs (`layers.weight_as`): off (8 devices, TPU target);
  * attention: the XLA form (`layers._attention_xla`) as on accelerators, without the CPU's query
    chunks. The kernels "auto" picks, Pallas splash on a TPU and cuDNN on a GPU, do not run on CPU
    devices, so `model.attention_impl` is "xla"; their agreement with the XLA form is tested in
    tests/model/test_attention.py.

Gradients: the optimizer is SGD with momentum 0.9 and learning rate 1. After the first step the
momentum is the step's accumulated float32 gradient, exactly (and sharded like its parameter, as
AdamW's moments are), and the new parameters are the old ones minus it. AdamW's first update would
keep only the signs of the gradient.

Tolerances, relative: per gradient leaf the norm of the difference over the leaf's norm, and the
largest element difference over the leaf's largest element. Measured on this batch, set about 5x
above the worst:
  * float32 compute: float32 rounding in another order is all that differs. Most leaves agree to
    1e-6; the worst, 1.5e-4 (norm) and 2.2e-4 (element), are kernels and biases of the depth head's
    second pyramid level, whose gradient is a near-cancelling sum (SILog hardly changes under a
    common scale of the map) small against its terms: the plain step itself moves them by the same
    amounts when it takes the batch as 2 micro-batches instead of 1. Tolerance 1e-3 per leaf; loss
    terms 1e-6 (measured 1.6e-7); gradient norm 1e-6 (measured < 1e-7).
  * bfloat16 compute (the preset's): a bfloat16 rounding errs by up to 2^-8 = 3.9e-3 (8 significant
    bits), and a gradient leaf goes through some ten of them forward and backward: about
    sqrt(10) * 3.9e-3 = 1.2e-2 expected. Measured: 2.7e-2 (norm) and 4.5e-2 (element); tolerances
    0.15 and 0.2. The loss terms average their rounding over 16 maps and 208 reply tokens:
    measured 3.7e-5 (depth), tolerance 2e-4. Gradient norm: measured 1.6e-3, tolerance 1e-2.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from data_pipelines import pipeline, synthetic
from depthvlm_jax import presets
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import random_params
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.processing.tokenizer import load_tokenizer
from depthvlm_jax.runs import freeze
from depthvlm_jax.runs.model_from_config import build_model, params_like
from depthvlm_jax.train import config_checks, distributed, model_state
from depthvlm_jax.train.data import example_specs, micro_batches, to_global
from depthvlm_jax.train.step import initial_state, make_train_step, row_counts

pytestmark = pytest.mark.slow

BUCKET = (96, 128)
DEPTH_GRID = (3, 4)  # the bucket in image tokens (32 px)
GLOBAL_BATCH = 16  # 2 micro-batches of one row per device
MICRO_BATCHES = 2
OPTIMIZER = optax.sgd(1.0, momentum=0.9)  # see the module docstring

# (loss terms, gradient norm, per-leaf norm, per-leaf largest element): relative tolerances (module docstring)
TOLERANCES = {"float32": (1e-6, 1e-6, 1e-3, 1e-3), "bfloat16": (2e-4, 1e-2, 0.15, 0.2)}


def backbone() -> Qwen3VLConfig:
  """Tiny widths; scanned runs of 2 blocks in each tower: vision blocks 2-3 (after the DeepStack
  taps 0, 1), decoder layers 3-4 (after the 3 DeepStack layers)."""
  tiny = Qwen3VLConfig.tiny(tie_word_embeddings=True)
  return dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, deepstack_visual_indexes=(0, 1, 3)),
                             text=dataclasses.replace(tiny.text, num_hidden_layers=5))


def paper_config(stage: int, compute_dtype: str = "bfloat16"):
  """The paper_4b preset's stage config on the small backbone: its model, freezing and mesh settings;
  the default preset's narrow DPT widths and one small bucket; 2 micro-batches of 8 rows."""
  c = presets.get_config(stage, "paper_4b")
  c.update_from_flattened_dict({k: v for k, v in presets.PRESETS["default"].items() if k.startswith("model.dpt_")})
  c.model.compute_dtype = compute_dtype
  c.model.attention_impl = "xla"  # splash / cuDNN do not run on CPU devices (module docstring)
  c.data.buckets = (BUCKET,)
  c.data.seq_len = 128
  c.train.global_batch = GLOBAL_BATCH
  c.train.micro_batches = MICRO_BATCHES
  c.train.per_device_rows = "0"  # the preset's "auto" sizes the batch by compiling; here it is given
  return c


def paper_model(c):
  """`build_model` of the config (dtypes, remat, scan, attention kernel) on the small backbone."""
  return build_model(c).clone(config=backbone().with_attention_impl(c.model.attention_impl))


@pytest.fixture(scope="module")
def loader_batch(tmp_path_factory):
  """One global batch of 16 as the input pipeline hands it to the trainer (host arrays)."""
  root = tmp_path_factory.mktemp("synthetic")
  files = synthetic.ensure_synthetic_dataset(root, GLOBAL_BATCH, 1, seed=0)
  c = paper_config(2)
  config = paper_model(c).config
  ds = pipeline.make_dataset([pipeline.SourceSpec(str(files["train"]), str(root), str(root), "synthetic")], [None],
                             example_specs(c, config), config, load_tokenizer(None), ImageProcessorConfig(), seed=0)
  return next(iter(pipeline.batched(ds, GLOBAL_BATCH)))


@dataclasses.dataclass
class Step:
  """One step's results on the host (flat parameter paths)."""

  metrics: dict[str, float]
  grads: dict[tuple[str, ...], np.ndarray]  # the accumulated float32 gradient (the momentum)
  params: dict[tuple[str, ...], np.ndarray]  # trainable parameters after the step
  program: str  # the lowered program with source locations
  start: dict[tuple[str, ...], np.ndarray]  # trainable parameters before the step


def _host_step(start, state, metrics, lowered) -> Step:
  return Step({k: float(v) for k, v in metrics.items()}, flatten_dict(jax.device_get(state["opt_state"][0].trace)),
              flatten_dict(jax.device_get(state["params"])), lowered.as_text(debug_info=True), start)


def start_values(c, model, mesh, seed: int):
  """(host values as the run stores them, abstract params of the run, trainable mask)."""
  like, mask = params_like(c, model, mesh)
  dtypes = {p: x.dtype for p, x in flatten_dict(like).items()}
  values = {p: np.asarray(jnp.asarray(v).astype(dtypes[p])) for p, v in flatten_dict(random_params(model, seed)).items()}
  return values, like, mask


def reference_step(stage: int, batch) -> Step:
  """(a): the unscanned float32 model on one device, one micro-batch, the CPU program."""
  c = paper_config(stage)
  model = paper_model(c).clone(dtype=jnp.float32, remat=False, scan_layers=False)
  mesh = config_checks.make_mesh(c)
  values, _, mask = start_values(c, model, mesh, seed=stage)
  trainable, frozen = freeze.split_params(unflatten_dict({p: v.astype(np.float32) for p, v in values.items()}), mask)
  step = jax.jit(make_train_step(model, OPTIMIZER, DEPTH_GRID, 1, c.train.depth_loss_weight, with_lm=stage == 2,
                                 lm_positions=c.train.lm_positions, platform="cpu",
                                 processor=model_state.train_processor(c, model)))
  # the very arrays (b) gets, assembled as the trainer does, then taken to the host
  host_batch = jax.device_get(to_global(batch, mesh, distributed.data_shard(mesh, GLOBAL_BATCH)))
  state = initial_state(trainable, OPTIMIZER.init(trainable))
  lowered = step.trace(state, frozen, host_batch).lower()
  new_state, metrics = lowered.compile()(state, frozen, host_batch)
  return _host_step(flatten_dict(trainable), new_state, metrics, lowered)


@pytest.fixture(scope="module")
def reference():
  cache = {}
  return lambda stage, batch: cache[stage] if stage in cache else cache.setdefault(stage, reference_step(stage, batch))


def paper_step(stage: int, compute_dtype: str, batch):
  """(b): the trainer's jitted programs of the paper config (`accumulate` per micro-batch, then
  `apply`), traced for a TPU, on the 8-device mesh.

  Returns (Step, the state before and after, the frozen params) for the sharding checks; the Step's
  program is the lowered `accumulate` (where the model runs).
  """
  c = paper_config(stage, compute_dtype)
  model = paper_model(c)
  assert model.scan_layers and model.remat and model.dtype == jnp.dtype(compute_dtype)
  mesh = config_checks.make_mesh(c)
  values, like, mask = start_values(c, model, mesh, seed=stage)
  placed = jax.tree.map(lambda v, x: jax.device_put(v, x.sharding), unflatten_dict(values), like)
  trainable, frozen = freeze.split_params(placed, mask)
  # as `model_state.restore_or_initialise` starts a run
  state_like = model_state.abstract_state(OPTIMIZER, freeze.split_params(like, mask)[0], mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state_like)
  opt_state = jax.jit(OPTIMIZER.init, out_shardings=shardings["opt_state"])(trainable)
  state = {k: v if k in ("params", "opt_state") else jax.device_put(v, shardings[k])
           for k, v in initial_state(trainable, opt_state).items()}
  programs = model_state.jit_train_programs(c, model, OPTIMIZER, mesh, state_like, DEPTH_GRID, target="tpu")
  shard = distributed.data_shard(mesh, GLOBAL_BATCH)
  # the first micro-batch and the batch's denominators exactly as `TrainPrograms.__call__` makes them
  first = next(micro_batches(batch, mesh, shard, MICRO_BATCHES))
  counts = to_global(row_counts(batch, DEPTH_GRID, model.config.vision.spatial_merge_size, stage == 2), mesh, shard)
  lowered = programs.accumulate.trace(state, frozen, programs.zeros(), first, counts).lower()
  before = jax.tree.map(lambda x: x.sharding, state)
  new_state, metrics = programs(state, frozen, batch, mesh, shard)  # donates `state`
  start = {p: v for p, v in values.items() if mask[p]}
  return _host_step(start, new_state, metrics, lowered), before, new_state, frozen


# The functions of `cpu_kernels` that only XLA:CPU programs call (`conv_same`, there too, is everyone's).
CPU_KERNELS = {"_conv3x3_fwd", "_conv3x3_bwd", "kernel_grad_3x3", "_conv3x3_of_resized_fwd", "_conv3x3_of_resized_bwd",
               "weight_after_input", "attention_in_query_chunks"}


def function_names(program: str) -> set[str]:
  """Names of the Python functions in the source locations of a lowered program (`as_text(debug_info=True)`)."""
  return set(re.findall(r'loc\("([\w.<>]+)"\(#', program))


def relative_errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
  """(norm of the difference / norm of want, largest element difference / largest |want|)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale_norm, scale_max = np.linalg.norm(want), np.abs(want).max()
  diff = got - want
  return (float(np.linalg.norm(diff) / scale_norm) if scale_norm else float(np.linalg.norm(diff)),
          float(np.abs(diff).max() / scale_max) if scale_max else float(np.abs(diff).max()))


@pytest.mark.parametrize("stage,compute_dtype", [(2, "bfloat16"), (2, "float32")])
def test_paper_step_on_mesh_equals_plain_step(loader_batch, reference, stage, compute_dtype):
  want = reference(stage, loader_batch)
  got, before, after, frozen = paper_step(stage, compute_dtype, loader_batch)
  tol_loss, tol_grad_norm, tol_leaf, tol_leaf_max = TOLERANCES[compute_dtype]

  # (b) is sharded: every array over the 8 devices, the towers' matrices split (FSDP), and the state
  # keeps its shardings through the step
  leaves = flatten_dict({"trainable": after["params"], "frozen": frozen})
  assert all(len(x.sharding.device_set) == 8 for x in leaves.values())
  towers = {p: x for p, x in leaves.items() if p[1] in ("visual", "language_model") and x.ndim >= 2}
  assert towers and all(x.sharding.shard_shape(x.shape) != x.shape for x in towers.values()), \
      [p for p, x in towers.items() if x.sharding.shard_shape(x.shape) == x.shape]
  assert any(p[0] == "trainable" for p in towers) == (stage == 2)  # stage 2 trains the decoder
  momentum = flatten_dict(after["opt_state"][0].trace)  # sharded as its parameter (FSDP optimizer state)
  assert all(momentum[p].sharding == x.sharding for p, x in flatten_dict(after["params"]).items())
  assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, after)) == jax.tree.leaves(before)
  assert {x.dtype for p, x in leaves.items() if p[0] == "frozen"} == {jnp.dtype(jnp.bfloat16)}

  # (b) scans each tower's blocks (stage 2 also the decoder's backward); the micro-batches are the
  # host's loop over `accumulate` calls; (a) has no loop at all
  loops = got.program.count("stablehlo.while")
  assert loops >= (3 if stage == 2 else 2), loops
  assert want.program.count("stablehlo.while") == 0
  # (b) runs the accelerators' code: the TPU resize and none of the XLA:CPU kernels (which (a) has)
  assert "_resize_axis_matmul" in function_names(got.program)
  assert "_resize_axis_matmul" not in function_names(want.program)
  assert CPU_KERNELS & function_names(want.program), function_names(want.program)
  assert not CPU_KERNELS & function_names(got.program)

  # the same batch seen: exact counts
  assert got.metrics["depth_images"] == want.metrics["depth_images"] == GLOBAL_BATCH
  assert got.metrics["lm_tokens"] == want.metrics["lm_tokens"] and (want.metrics["lm_tokens"] > 0) == (stage == 2)
  assert got.metrics["finite"] == want.metrics["finite"] == 1.0
  for name in ("loss", "depth_loss", "lm_loss"):
    np.testing.assert_allclose(got.metrics[name], want.metrics[name], rtol=tol_loss, err_msg=name)
  np.testing.assert_allclose(got.metrics["grad_norm"], want.metrics["grad_norm"], rtol=tol_grad_norm)
  assert want.metrics["grad_norm"] > 0

  assert got.grads.keys() == want.grads.keys() == got.params.keys()
  worst = {}
  for path, g in want.grads.items():
    err = relative_errors(got.grads[path], g)
    worst[path] = err
    assert err[0] <= tol_leaf and err[1] <= tol_leaf_max, ("/".join(path), err)
  by_norm = max(worst, key=lambda p: worst[p][0])
  by_max = max(worst, key=lambda p: worst[p][1])
  rel = {k: abs(got.metrics[k] - want.metrics[k]) / (abs(want.metrics[k]) or 1)
         for k in ("loss", "depth_loss", "lm_loss", "grad_norm")}
  print(f"stage {stage} {compute_dtype}: relative errors {', '.join(f'{k} {v:.1e}' for k, v in rel.items())}; "
        f"worst of {len(worst)} gradient leaves: {'/'.join(by_norm)} {worst[by_norm][0]:.2e} (norm), "
        f"{'/'.join(by_max)} {worst[by_max][1]:.2e} (largest element)")

  # SGD, learning rate 1: each step's new parameters are its start values minus its own gradient
  # (exactly), so they agree as the gradients do
  for path, new in got.params.items():
    start = got.start[path]
    np.testing.assert_array_equal(want.start[path], start)
    np.testing.assert_array_equal(new, start - got.grads[path])
    np.testing.assert_array_equal(want.params[path], start - want.grads[path])
    atol = tol_leaf_max * np.abs(want.grads[path]).max() + 2 * np.spacing(np.abs(start).max())
    np.testing.assert_allclose(new, want.params[path], rtol=0, atol=atol, err_msg="/".join(path))
