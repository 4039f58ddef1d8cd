"""The pure, jitted train step: masked losses as (sum, count), gradient accumulation, NaN guard.

The trainer runs one update as a chain of small programs (`make_train_programs`), so that a device
never holds more than one micro-batch of the global batch:
  * `accumulate(state, frozen, acc, micro, counts) -> acc`, once per micro-batch: the gradient of
    that micro-batch's loss, scaled by the global loss denominators (`counts`: per-row counts of the
    whole global batch, from `row_counts` on the host), added to the float32 accumulator;
  * `apply(state, frozen, acc) -> (state, metrics)`: the optimizer step on the accumulated gradient.
Loss numerators and denominators are summed across micro-batches and divided once, so K micro-batches
give the same update as one full batch.

`make_train_step` returns the same update as one program, `train_step(state, frozen, batch)`, over
the whole batch split into `micro_batches` slices accumulated by `lax.scan` (or a Python loop); it
is the reference the split programs are tested against and what the model FLOPs are counted on.

In both:
  * only the trainable subtree is differentiated (frozen towers get no gradient or optimizer state);
  * a non-finite loss or gradient leaves params and optimizer state untouched and counts in
    `state["skipped_updates"]`; it, or a non-finite update (which is applied, see the step),
    increments `state["nonfinite"]` (reset by the next good step).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from depthvlm_jax.losses import lm_cross_entropy, silog_loss
from depthvlm_jax.model.depthvlm import DepthVLM
from depthvlm_jax.processing.depth_codes import batch_depth
from depthvlm_jax.processing.device_patches import model_pixel_values, processor_for
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.runs.freeze import merge_params


def supervised_positions(labels: jax.Array, max_positions: int) -> tuple[jax.Array, jax.Array]:
  """The first `max_positions` supervised positions of each row, for the LM head alone.

  Position t is supervised when `labels[:, t + 1] != -100` (logits at t predict token t + 1).

  Args:
    labels: (B, L) int, -100 = ignore.
    max_positions: M, static; a row with more supervised tokens loses the rest (the trainer checks
      every batch on the host with `max_supervised_tokens` and refuses such batches).

  Returns:
    positions (B, M) int32 into [0, L - 1) and their targets (B, M) (-100 where a row has fewer).
  """
  targets = labels[:, 1:]
  order = jnp.argsort(targets == -100, axis=1, stable=True)[:, :max_positions].astype(jnp.int32)
  return order, jnp.take_along_axis(targets, order, axis=1)


def max_supervised_tokens(labels: np.ndarray) -> int:
  """Host-side: the largest number of supervised next-token targets in any row of (B, L) labels."""
  return int((np.asarray(labels)[:, 1:] != -100).sum(1).max(initial=0))


def initial_state(trainable: Any, opt_state: Any) -> dict[str, Any]:
  """The train state `train_step` consumes: step and non-finite counters at zero, params, optimizer."""
  # Three separate buffers: the state is donated, and one buffer may not be donated twice.
  step, nonfinite, skipped = (jnp.zeros((), jnp.int32) for _ in range(3))
  return {"step": step, "params": trainable, "opt_state": opt_state, "nonfinite": nonfinite,
          "skipped_updates": skipped}


def loss_terms(model: DepthVLM, params, batch: dict[str, jax.Array], depth_grid: tuple[int, int],
               with_lm: bool, lm_positions: int = 0,
               processor: ImageProcessorConfig | None = None) -> dict[str, jax.Array]:
  """Numerators and denominators of both losses for one (micro-)batch.

  The images come as `pixel_values` rows or as uint8 `pixels`, patched here (`model_pixel_values`
  with `processor`, default: the default processor at the model's patch geometry). The depth
  target comes as float32 metres or as uint16 codes with `depth_unit`, decoded here
  (`depth_codes.batch_depth`).
  lm_positions: 0 = LM head on every position; M > 0 = only on the first M supervised positions
  of each row (same loss, far fewer FLOPs when the vocabulary is large and replies are short).
  """
  gather = with_lm and lm_positions > 0
  processor = processor or processor_for(model.config.vision)
  out = model.apply({"params": params}, batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                    model_pixel_values(batch, processor), batch["image_grid_hw"], compute_logits=with_lm and not gather,
                    depth_grid=depth_grid, images_per_row=1)
  depth_mask = (batch["has_depth"] & out.depth_valid)[:, None, None]
  target = batch_depth(batch)  # metres; uint16 codes are decoded here, on the device
  depth_sum, depth_count = silog_loss(out.depth, target, valid_mask=depth_mask & (target > 0))
  terms = {"depth_sum": depth_sum, "depth_count": depth_count}
  if gather:
    pos, targets = supervised_positions(batch["labels"], lm_positions)
    hidden = jnp.take_along_axis(out.hidden_states, pos[..., None], axis=1)  # (B, M, D)
    logits = model.apply({"params": params}, hidden, method="logits")  # (B, M, V)
    # lm_cross_entropy shifts by one: pad so that logits[:, m] meets targets[:, m].
    logits = jnp.pad(logits, ((0, 0), (0, 1), (0, 0)))
    terms["lm_sum"], terms["lm_count"] = lm_cross_entropy(logits, jnp.pad(targets, ((0, 0), (1, 0)),
                                                                          constant_values=-100))
  elif with_lm:
    terms["lm_sum"], terms["lm_count"] = lm_cross_entropy(out.logits, batch["labels"])
  else:
    terms["lm_sum"] = terms["lm_count"] = jnp.zeros((), jnp.float32)
  return terms


def supervised_depth_images(batch: dict[str, jax.Array], depth_grid: tuple[int, int], merge: int = 2) -> jax.Array:
  """(B,) bool: images that carry depth supervision (has depth, grid within the bucket, >= 1 valid pixel).

  `depth` may be float32 metres or uint16 codes: a pixel is valid where it is above 0 in either.
  """
  h, w = depth_grid
  gh, gw = batch["image_grid_hw"][:, 0], batch["image_grid_hw"][:, 1]
  grid_ok = (gh > 0) & (gw > 0) & (gh <= merge * h) & (gw <= merge * w)
  any_valid = jnp.any(batch["depth"] > 0, axis=(1, 2))
  return batch["has_depth"] & grid_ok & any_valid


def row_counts(batch: dict[str, np.ndarray], depth_grid: tuple[int, int], merge: int = 2,
               with_lm: bool = True) -> dict[str, np.ndarray]:
  """Host-side, per row of a host batch: what each row adds to the global loss denominators.

  "depth" (B,) int32: 1 for an image with depth supervision (`supervised_depth_images`); "lm" (B,)
  int32: its supervised next-token targets (zeros without the LM loss). Summed over the global batch
  inside `accumulate`, they give every micro-batch the denominators of the whole batch.
  """
  h, w = depth_grid
  grid = np.asarray(batch["image_grid_hw"])
  depth = np.asarray(batch["depth"])
  n = depth.shape[0]
  grid_ok = (grid[:, 0] > 0) & (grid[:, 1] > 0) & (grid[:, 0] <= merge * h) & (grid[:, 1] <= merge * w)
  # fmax skips NaN: a row's largest non-NaN value, NaN only when every value is (then no valid pixel)
  any_valid = np.fmax.reduce(depth.reshape(n, -1), axis=1) > 0
  labels = np.asarray(batch["labels"])
  lm = (labels[:, 1:] != -100).sum(1) if with_lm else np.zeros(n)
  return {"depth": (np.asarray(batch["has_depth"]) & grid_ok & any_valid).astype(np.int32), "lm": lm.astype(np.int32)}


def combine(terms: dict[str, jax.Array], depth_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """total = lm_mean + w * depth_mean; a term with no supervision contributes 0."""
  depth = terms["depth_sum"] / jnp.maximum(terms["depth_count"], 1)
  lm = terms["lm_sum"] / jnp.maximum(terms["lm_count"], 1)
  return lm + depth_weight * depth, {"depth_loss": depth, "lm_loss": lm}


def _split_micro(batch, k: int):
  """(B, ...) -> (k, B / k, ...) with interleaved rows: micro-batch i holds rows i, i + k, i + 2k, ...

  The global batch is sharded over the devices in contiguous blocks of rows, so interleaving gives
  every micro-batch rows on every device (a contiguous split would put micro-batch i on a few
  devices only and replicate its work on the others).
  """
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch dim {x.shape[0]} not divisible by micro_batches={k}")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

  out = {n: split(v) for n, v in batch.items() if n != "position_ids"}
  pos = batch["position_ids"]  # (3, B, L)
  out["position_ids"] = jnp.moveaxis(pos.reshape(3, -1, k, pos.shape[-1]), 2, 0)
  return out


def _depth_weight(depth_weight: float, with_lm: bool) -> float:
  # As the reference: the weight balances depth against LM; depth alone is used unweighted.
  return depth_weight if with_lm else 1.0


def _micro_gradient(model: DepthVLM, depth_grid: tuple[int, int], depth_weight: float, with_lm: bool,
                    lm_positions: int, processor: ImageProcessorConfig | None) -> Callable:
  """`grad(trainable, frozen, micro, depth_den, lm_den) -> (gradient, loss terms)` of one micro-batch:
  its loss scaled by the global denominators, so the gradients of the micro-batches add up to the
  gradient of the whole batch's loss."""
  def scaled_loss(tp, frozen, mb, depth_den, lm_den):
    terms = loss_terms(model, merge_params(tp, frozen), mb, depth_grid, with_lm, lm_positions, processor)
    return depth_weight * terms["depth_sum"] / depth_den + terms["lm_sum"] / lm_den, terms

  return jax.grad(scaled_loss, has_aux=True)


TERM_NAMES = ("depth_sum", "depth_count", "lm_sum", "lm_count")


def zero_accumulator(trainable: Any) -> dict[str, Any]:
  """The accumulator an update starts from: float32 zeros like the trainable params, zero loss terms."""
  return {"grads": jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable),
          "terms": {k: jnp.zeros((), jnp.float32) for k in TERM_NAMES}}


def _add(acc: dict[str, Any], grads: Any, terms: dict[str, jax.Array]) -> dict[str, Any]:
  return {"grads": jax.tree.map(lambda x, y: x + y.astype(jnp.float32), acc["grads"], grads),
          "terms": {k: acc["terms"][k] + terms[k] for k in TERM_NAMES}}


def _finish(optimizer: optax.GradientTransformation, state: dict[str, Any], acc: dict[str, Any],
            depth_weight: float) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  terms = acc["terms"]
  loss, parts = combine(terms, depth_weight)
  new_state, metrics = guarded_update(optimizer, state, acc["grads"], loss)
  metrics.update(parts, depth_images=terms["depth_count"], lm_tokens=terms["lm_count"])
  return new_state, metrics


def make_train_programs(model: DepthVLM, optimizer: optax.GradientTransformation, depth_grid: tuple[int, int],
                        depth_weight: float, with_lm: bool, lm_positions: int = 0,
                        processor: ImageProcessorConfig | None = None) -> tuple[Callable, Callable]:
  """The jittable `(accumulate, apply)` of one update consumed one micro-batch at a time.

  accumulate(state, frozen, acc, micro, counts) -> acc: `micro` one micro-batch (rows, ...),
    `counts` the per-row `row_counts` of the whole global batch (tiny); reads `state["params"]` only.
  apply(state, frozen, acc) -> (state, metrics): the update from the accumulated gradient (NaN guard
    in `guarded_update`).
  Both take the whole state and the frozen params, the arrays a device holds throughout, so their
  compiled argument bytes are what the device holds while they run.
  """
  depth_weight = _depth_weight(depth_weight, with_lm)
  grad_fn = _micro_gradient(model, depth_grid, depth_weight, with_lm, lm_positions, processor)

  def accumulate(state: dict[str, Any], frozen: Any, acc: dict[str, Any], micro: dict[str, jax.Array],
                 counts: dict[str, jax.Array]) -> dict[str, Any]:
    depth_den = jnp.maximum(counts["depth"].sum(), 1).astype(jnp.float32)
    lm_den = jnp.maximum(counts["lm"].sum(), 1).astype(jnp.float32) if with_lm else 1.0
    grads, terms = grad_fn(state["params"], frozen, micro, depth_den, lm_den)
    return _add(acc, grads, terms)

  def apply(state: dict[str, Any], frozen: Any, acc: dict[str, Any]):
    del frozen  # an argument only so that the compiled program counts it as resident
    return _finish(optimizer, state, acc, depth_weight)

  return accumulate, apply


def make_train_step(model: DepthVLM, optimizer: optax.GradientTransformation, depth_grid: tuple[int, int],
                    micro_batches: int, depth_weight: float, with_lm: bool, lm_positions: int = 0,
                    platform: str = "cpu", unroll_micro_batches: bool | None = None,
                    processor: ImageProcessorConfig | None = None) -> Callable:
  """The jittable `train_step(state, frozen, batch) -> (state, metrics)` over the whole global batch.

  The same update as `make_train_programs` in one program (the trainer runs those: this one holds
  the whole batch on the devices).
  processor: the normalisation of uint8 `pixels` batches (see `loss_terms`).

  platform: the compile target ("cpu", "tpu", "gpu"): the platform of the mesh's devices, not the
    host that traces (an ahead-of-time compile for a TPU slice runs on a CPU host).
  unroll_micro_batches: accumulate gradients in a Python loop (K copies of the model in the
    program) instead of `lax.scan`. None = unroll when there is one micro-batch or the target is
    the CPU: XLA:CPU runs convolutions inside a while-loop body through a slow generic path
    (jax-ml/jax#12868), many times slower than the same convolutions outside a loop. Accelerators
    keep the scan, whose program size does not grow with K.
  """
  unroll = (micro_batches == 1 or platform == "cpu") if unroll_micro_batches is None else unroll_micro_batches
  depth_weight = _depth_weight(depth_weight, with_lm)
  grad_fn = _micro_gradient(model, depth_grid, depth_weight, with_lm, lm_positions, processor)

  def train_step(state: dict[str, Any], frozen: Any, batch: dict[str, jax.Array]):
    trainable = state["params"]
    # Global denominators come from the batch itself, so every micro-batch can be scaled up front
    # and one scalar differentiated per micro-batch.
    depth_den = jnp.maximum(supervised_depth_images(batch, depth_grid, model.config.vision.spatial_merge_size).sum(), 1).astype(jnp.float32)
    lm_den = jnp.maximum((batch["labels"][:, 1:] != -100).sum(), 1).astype(jnp.float32) if with_lm else 1.0

    def body(acc, mb):
      return _add(acc, *grad_fn(trainable, frozen, mb, depth_den, lm_den)), None

    micro = _split_micro(batch, micro_batches)
    if unroll:  # K copies of the step in one program: no while loop (see `make_train_step`)
      acc = zero_accumulator(trainable)
      for i in range(micro_batches):
        acc, _ = body(acc, jax.tree.map(lambda x: x[i], micro))
    else:
      acc, _ = jax.lax.scan(body, zero_accumulator(trainable), micro)
    return _finish(optimizer, state, acc, depth_weight)

  return train_step


def guarded_update(optimizer: optax.GradientTransformation, state: dict[str, Any], grads: Any,
                   loss: jax.Array) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """The optimizer step after the gradients: NaN guard, in-place update, counters and norms.

  Everything of `train_step` that runs once per update, outside the micro-batch loop (the AOT
  report compiles it alone to cost that loop correctly).
  """
  trainable = state["params"]
  grad_norm = optax.tree.norm(grads)
  # The guard is decided before the update, so the optimizer's pass over params and moments runs
  # once, inside the branch, in place. Refusing on the update itself would keep the update, the
  # new and the old state alive together, and the optimizer's pass over them would run twice.
  inputs_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply_update():
    updates, new_opt = optimizer.update(grads, state["opt_state"], trainable)
    new_params = optax.apply_updates(trainable, updates)
    # The norm of what was applied, from the difference (fused with the update pass).
    applied = optax.tree.norm(jax.tree.map(lambda n, o: n.astype(jnp.float32) - o, new_params, trainable))
    return new_params, new_opt, applied

  def skip_update():
    return trainable, state["opt_state"], jnp.zeros((), jnp.float32)

  new_params, new_opt, update_norm = jax.lax.cond(inputs_finite, apply_update, skip_update)
  # A non-finite update from finite gradients (an overflowing optimizer, a bad learning rate) is
  # already applied: the step counts as non-finite, so no checkpoint is written from these params
  # and the run stops after `max_nonfinite_steps`, naming the last good checkpoint.
  finite = inputs_finite & jnp.isfinite(update_norm)
  new_state = {
      "step": state["step"] + 1,
      "params": new_params,
      "opt_state": new_opt,
      "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
      "skipped_updates": state["skipped_updates"] + (~inputs_finite).astype(jnp.int32),
  }
  # `nonfinite` also among the metrics: the state is donated to the next step, the metrics are not,
  # so the host can read the counter after the next step is dispatched.
  metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(trainable), update_norm=update_norm,
                 finite=finite, nonfinite=new_state["nonfinite"])
  return new_state, metrics
