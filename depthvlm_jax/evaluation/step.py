"""The compiled evaluation forwards: built once per model and mesh, compiled once per bucket.

Both are `jax.jit` objects with explicit shardings, created once and reused for every call and every
dataset; jax compiles one program per bucket (input shapes and the static depth grid):
  * `jit_depth_maps`: depth maps (B, H, W), rows sharded over the mesh's batch axes (the evaluation
    and prediction CLIs read them back on the host);
  * `jit_delta1`: per-image δ1 and valid-pixel counts (B,), replicated, so the depth maps never
    leave the devices and every process of a multi-host run can read the result (the trainer's
    held-out evaluation).
Inputs: the row-major batch of `DepthVLM.__call__` (`position_ids` (3, B, L), every other array rows
first; `jit_delta1` takes the images as uint8 `pixels`, patched on the device as in training,
`processing.device_patches`), the global batch a multiple of the mesh's batch shards (pad, shard, unpad: callers pad the
last batch and drop the padded rows' results).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from depthvlm_jax import sharding
from depthvlm_jax.evaluation.metrics import delta1_per_image
from depthvlm_jax.processing.device_patches import model_pixel_values, processor_for

# Logical names of each input's leading dims; every other input is (B, ...).
INPUT_NAMES = {"position_ids": (None, "batch")}
MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask", "pixel_values", "image_grid_hw")


def input_sharding(mesh, key: str) -> jax.sharding.NamedSharding:
  """Where an input array lives: its batch dim split over the mesh's batch axes."""
  return sharding.activation_sharding(mesh, *INPUT_NAMES.get(key, ("batch",)))


def batch_shardings(mesh, keys) -> dict[str, jax.sharding.NamedSharding]:
  return {k: input_sharding(mesh, k) for k in keys}


def _depth(model, params, batch: dict[str, Any], depth_grid: tuple[int, int], processor=None) -> jax.Array:
  pixel_values = model_pixel_values(batch, processor or processor_for(model.config.vision))
  out = model.apply({"params": params}, batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                    pixel_values, batch["image_grid_hw"], compute_logits=False,
                    depth_grid=depth_grid, images_per_row=1)  # one image per prompt: placed row-locally
  return out.depth


def jit_depth_maps(model, mesh=None, param_shardings=None):
  """`fn(params, batch, depth_grid) -> (B, 32h, 32w)` depth; `depth_grid` (h, w) is static.

  With a mesh: parameters in at `param_shardings` (a tree like the params), batch rows in and depth
  rows out split over the batch axes. Without one: the default device.
  """
  def depth_maps(params, batch, depth_grid):
    return _depth(model, params, batch, depth_grid)

  if mesh is None:
    return jax.jit(depth_maps, static_argnums=2)
  return jax.jit(sharding.in_mesh(depth_maps, mesh), static_argnums=2,
                 in_shardings=(param_shardings, batch_shardings(mesh, MODEL_INPUTS)),
                 out_shardings=input_sharding(mesh, "depth"))


DELTA1_INPUTS = ("input_ids", "position_ids", "attention_mask", "pixels", "image_grid_hw", "depth", "valid")


def jit_delta1(model, mesh, param_shardings, processor=None):
  """`fn(params, batch) -> (delta1 (B,), count (B,))`, replicated on every device.

  batch: the model inputs with uint8 `pixels` (normalised with `processor`, default: the default
  processor at the model's patch geometry), `depth` (B, H, W) ground truth (0 = invalid pixel) of the bucket and
  `valid` (B,) bool, False for padded rows, whose count is returned as 0 (they never score). The
  depth grid is the ground truth's size over `image_token_pixels`, so one program per bucket.
  """
  px = model.config.vision.image_token_pixels

  def delta1_step(params, batch):
    h, w = batch["depth"].shape[1:]
    pred = _depth(model, params, batch, (h // px, w // px), processor)
    d1, count = delta1_per_image(pred, batch["depth"])
    return d1, jnp.where(batch["valid"], count, 0)

  replicated = sharding.activation_sharding(mesh)
  return jax.jit(sharding.in_mesh(delta1_step, mesh), in_shardings=(param_shardings, batch_shardings(mesh, DELTA1_INPUTS)),
                 out_shardings=(replicated, replicated))
