"""DepthVLM: Qwen3-VL plus a depth head; one forward gives LM logits and metric depth maps.

The depth head reads four token-feature maps per image: the three DeepStack merger
outputs and the LLM's last hidden states (after the final norm) at the image tokens. Depth is
computed on the static token grid `depth_grid` of the call (the bucket): an image whose own grid
fits inside it sits at the top left, the rest of the map is zero features (padding, which the
training data marks as carrying no depth). Slots of padding images, or images larger than the
bucket, get `depth_valid == False`. One compiled program per bucket, no per-image Python loops.

Parameter tree: the Qwen3-VL tree (`visual`, `language_model`, `lm_head`) plus `depth_head`, which
map onto the official checkpoint's `model.*`, `lm_head.*` and `depth_head.*` keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from depthvlm_jax.model.config import ConfigError, Qwen3VLConfig
from depthvlm_jax.model.depth_head import HEAD_TYPES, MLP_FEATURE_MODES, make_depth_head
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.model.qwen3_vl import Qwen3VL, Qwen3VLOutput, dummy_inputs
from depthvlm_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class DepthHeadConfig:
  """Which depth head (`depth_head_type` in the official config.json) and its options."""

  head_type: str = "dpt"
  mlp_feature_mode: str = "llm_last"
  mlp_hidden: int = 1024
  # DPT widths: official values by default; smaller ones for tiny CPU models.
  features: int = 256
  out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
  head_features: int = 32

  def __post_init__(self):
    if self.head_type not in HEAD_TYPES:
      raise ConfigError(f"depth_head_type={self.head_type!r}; expected one of {HEAD_TYPES}")
    if self.mlp_feature_mode not in MLP_FEATURE_MODES:
      raise ConfigError(f"mlp_feature_mode={self.mlp_feature_mode!r}; expected one of {MLP_FEATURE_MODES}")

  @classmethod
  def tiny(cls, head_type: str = "dpt") -> "DepthHeadConfig":
    """Narrow DPT widths for the tiny CPU model."""
    return cls(head_type=head_type, features=32, out_channels=(16, 32, 48, 64), head_features=8)

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "DepthHeadConfig":
    """Reads the official top-level keys (`depth_head_type`, `depth_head_feature_mode`, ...)."""
    return cls(head_type=d.get("depth_head_type", "dpt"),
               mlp_feature_mode=d.get("depth_head_feature_mode", "llm_last"),
               mlp_hidden=int(d.get("depth_head_mlp_hidden", 1024)),
               features=int(d.get("depth_head_features", 256)),
               out_channels=tuple(d.get("depth_head_out_channels", (256, 512, 1024, 1024))),
               head_features=int(d.get("depth_head_head_features", 32)))

  def to_hf_dict(self) -> dict[str, Any]:
    """Top-level config.json fields (the official ones plus our DPT widths)."""
    return {"depth_head_type": self.head_type, "depth_head_feature_mode": self.mlp_feature_mode,
            "depth_head_mlp_hidden": self.mlp_hidden, "depth_head_features": self.features,
            "depth_head_out_channels": list(self.out_channels), "depth_head_head_features": self.head_features}


class DepthVLMOutput(NamedTuple):
  logits: jax.Array | None  # (B, L, V)
  hidden_states: jax.Array  # (B, L, D)
  depth: jax.Array | None  # (N, H, W) metres, for image slots of the depth bucket
  depth_valid: jax.Array | None  # (N,) bool: the slot's image fits the bucket grid
  cache: Any


def image_feature_maps(out: Qwen3VLOutput, grid_hw: jax.Array, depth_grid: tuple[int, int], merge: int):
  """The head's 4 inputs as (N, h, w, D) maps on the bucket grid `depth_grid` (token units), plus
  which slots hold an image that fits it.

  Image n's tokens (raster order over its own token grid (hn, wn) = grid_hw[n] / merge) fill the top
  left hn x wn cells; the other cells are 0. For hn, wn = h, w this is a plain reshape.
  """
  feats = out.image_features
  h, w = depth_grid
  n, t, d = feats.llm_last.shape
  if t < h * w:
    raise ValueError(f"depth_grid {depth_grid} needs {h * w} tokens per image; batch has {t} token slots")
  th, tw = (grid_hw[:, 0] // merge)[:, None, None], (grid_hw[:, 1] // merge)[:, None, None]
  row, col = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  inside = (row < th) & (col < tw)  # (N, h, w)
  source = jnp.where(inside, row * tw + col, 0).reshape(n, h * w, 1)
  maps = [constrain(jnp.where(inside[..., None], jnp.take_along_axis(f, source, axis=1).reshape(n, h, w, d), 0),
                    "images", None, None, "act_embed") for f in (*feats.deepstack, feats.llm_last)]
  valid = (th[:, 0, 0] > 0) & (tw[:, 0, 0] > 0) & (th[:, 0, 0] <= h) & (tw[:, 0, 0] <= w)
  return maps, valid


class DepthVLM(Qwen3VL):
  """Qwen3-VL backbone + depth head (fields: config, head, dtype, param_dtype, remat)."""

  head: DepthHeadConfig = DepthHeadConfig()

  def setup(self):
    super().setup()
    if len(self.config.vision.deepstack_visual_indexes) != 3:
      raise ConfigError("the DepthVLM head needs exactly 3 DeepStack levels, got "
                        f"{list(self.config.vision.deepstack_visual_indexes)}")
    h = self.head
    options = (dict(features=h.features, out_channels=tuple(h.out_channels), head_features=h.head_features)
               if h.head_type == "dpt" else dict(feature_mode=h.mlp_feature_mode, mlp_hidden=h.mlp_hidden))
    self.depth_head = make_depth_head(h.head_type, self.config.text.hidden_size, dtype=self.dtype,
                                      param_dtype=self.param_dtype, **options)

  def __call__(self, input_ids, position_ids, attention_mask, pixel_values=None, image_grid_hw=None,
               cache=None, cache_index=None, compute_logits: bool = True,
               depth_grid: tuple[int, int] | None = None,
               depth_output_size: tuple[int, int] | None = None,
               images_per_row: int | None = None) -> DepthVLMOutput:
    """Backbone forward (see `Qwen3VL.__call__`) plus depth for the images of grid `depth_grid`.

    Args:
      depth_grid: static (h, w) token grid of the depth bucket (image of 32h x 32w pixels); None
        skips the depth head.
      depth_output_size: static (H, W) of the returned maps; default (32h, 32w).
      images_per_row: static images per batch row (see `Qwen3VL.__call__`); 1 for training batches.
    """
    out = super().__call__(input_ids, position_ids, attention_mask, pixel_values, image_grid_hw, cache,
                           cache_index, compute_logits, return_image_features=depth_grid is not None,
                           images_per_row=images_per_row)
    depth = valid = None
    if depth_grid is not None and pixel_values is not None:
      maps, valid = image_feature_maps(out, image_grid_hw, depth_grid, self.config.vision.spatial_merge_size)
      depth = constrain(self.depth_head(maps, output_size=depth_output_size), "images", None, None)
    return DepthVLMOutput(out.logits, out.hidden_states, depth, valid, out.cache)


def depthvlm_dummy_inputs(config: Qwen3VLConfig) -> dict[str, Any]:
  """Smallest inputs touching every parameter, depth head included (one 1x1-token image)."""
  return dict(dummy_inputs(config), depth_grid=(1, 1))


def depth_head_init(model: DepthVLM, rng: jax.Array) -> dict[str, Any]:
  """{"depth_head": params} of a fresh head alone, without creating the backbone's parameters.

  The values equal the `depth_head` subtree of `model.init(rng, ...)`: Linen derives each module's
  key from the root key and the module's path, which is the same here. Jittable (e.g. with
  `out_shardings`). The head's parameter shapes do not depend on the feature maps' size, so four
  1x1 maps suffice.
  """
  import flax.linen as nn
  maps = [jnp.zeros((1, 1, 1, model.config.text.hidden_size), jnp.float32)] * 4
  return nn.unbox(model.init(rng, maps, method=lambda m, x: m.depth_head(x))["params"])


def random_params(model: DepthVLM, seed: int = 0, std: float = 0.05) -> dict[str, Any]:
  """Random parameters for `model` without compiling its init (shapes from `jax.eval_shape`).

  Every weight is normal(0, std) and every norm scale is 1. On a 2-core CPU this takes seconds where
  the jitted init takes about a minute; used by tests and by the web demo's tiny untrained model.
  """
  import numpy as np
  from flax import traverse_util
  shapes = abstract_params(model, **depthvlm_dummy_inputs(model.config))
  rng = np.random.default_rng(seed)
  flat = {k: (np.ones(v.shape, v.dtype) if k[-1] == "scale" and any("norm" in x for x in k)
              else rng.normal(0, std, v.shape).astype(v.dtype))
          for k, v in traverse_util.flatten_dict(shapes).items()}
  return traverse_util.unflatten_dict(flat)
