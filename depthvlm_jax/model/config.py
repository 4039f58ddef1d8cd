"""Qwen3-VL model configuration as frozen dataclasses, read from / written to HF `config.json`.

Field names follow the Hugging Face `Qwen3VLConfig` (transformers 5.x) so a `config.json` maps
one-to-one. Only still images are supported (no video): `temporal_patch_size` frames are made by
repeating the image, so every image has grid_t == 1.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

# The attention kernels (`layers.attention`); here so that the config module stays free of JAX.
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")


class ConfigError(ValueError):
  """A model config that cannot describe a valid Qwen3-VL / DepthVLM model."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Vision tower (`vision_config` in HF)."""

  depth: int = 27
  hidden_size: int = 1152
  hidden_act: str = "gelu_pytorch_tanh"
  intermediate_size: int = 4304
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 16
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  out_hidden_size: int = 2560
  num_position_embeddings: int = 2304
  deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)
  rope_theta: float = 10000.0
  layer_norm_eps: float = 1e-6
  # Not part of HF config.json: the attention kernel (`layers.ATTENTION_IMPLS`; "auto" = by the
  # compile target). Set for both towers with `Qwen3VLConfig.with_attention_impl`.
  attention_impl: str = "auto"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened pixel patch: C * T * P * P."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def num_grid_per_side(self) -> int:
    return int(self.num_position_embeddings**0.5)

  @property
  def image_token_pixels(self) -> int:
    """Side in pixels of the square covered by one LLM image token (16 * 2 = 32)."""
    return self.patch_size * self.spatial_merge_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Qwen3 text decoder (`text_config` in HF)."""

  vocab_size: int = 151936
  hidden_size: int = 2560
  intermediate_size: int = 9728
  num_hidden_layers: int = 36
  num_attention_heads: int = 32
  num_key_value_heads: int = 8
  head_dim: int = 128
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 5000000.0
  mrope_section: tuple[int, int, int] = (24, 20, 20)
  mrope_interleaved: bool = True
  attention_bias: bool = False
  max_position_embeddings: int = 262144
  attention_impl: str = "auto"  # not part of HF config.json; see VisionConfig.attention_impl


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
  """The whole Qwen3-VL model."""

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tie_word_embeddings: bool = False

  def __post_init__(self):
    errors = []
    v, t = self.vision, self.text
    if v.hidden_size % v.num_heads:
      errors.append(f"vision_config.hidden_size={v.hidden_size} not divisible by num_heads={v.num_heads}")
    if v.head_dim % 4:
      errors.append(f"vision head_dim={v.head_dim} must be a multiple of 4 (2-D rotary)")
    if v.out_hidden_size != t.hidden_size:
      errors.append(f"vision_config.out_hidden_size={v.out_hidden_size} != text_config.hidden_size={t.hidden_size}")
    if t.num_attention_heads % t.num_key_value_heads:
      errors.append(f"text_config.num_attention_heads={t.num_attention_heads} not divisible by "
                    f"num_key_value_heads={t.num_key_value_heads}")
    if sum(t.mrope_section) != t.head_dim // 2:
      errors.append(f"text_config mrope_section={list(t.mrope_section)} must sum to head_dim/2={t.head_dim // 2}")
    if any(i < 0 or i >= v.depth for i in v.deepstack_visual_indexes):
      errors.append(f"vision_config.deepstack_visual_indexes={list(v.deepstack_visual_indexes)} "
                    f"outside [0, depth={v.depth})")
    if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
      errors.append("more DeepStack features than text decoder layers")
    if v.num_grid_per_side**2 != v.num_position_embeddings:
      errors.append(f"vision_config.num_position_embeddings={v.num_position_embeddings} is not a square")
    if t.hidden_act != "silu" or v.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
      errors.append(f"unsupported activations text={t.hidden_act!r} vision={v.hidden_act!r}")
    if not t.mrope_interleaved:
      errors.append("only interleaved MRoPE (Qwen3-VL) is supported")
    for name, impl in (("vision_config", v.attention_impl), ("text_config", t.attention_impl)):
      if impl not in ATTENTION_IMPLS:
        errors.append(f"{name}.attention_impl={impl!r} not one of {ATTENTION_IMPLS}")
    if errors:
      raise ConfigError("invalid Qwen3-VL config: " + "; ".join(errors))

  def with_attention_impl(self, impl: str) -> "Qwen3VLConfig":
    """The same model with attention kernel `impl` (`layers.ATTENTION_IMPLS`) in both towers."""
    return dataclasses.replace(self, vision=dataclasses.replace(self.vision, attention_impl=impl),
                               text=dataclasses.replace(self.text, attention_impl=impl))

  # ---------------------------------------------------------------- HF config.json I/O
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen3VLConfig":
    """Builds the config from a HF `config.json` dict (transformers 4.x or 5.x layout)."""
    try:
      vd = dict(d["vision_config"])
      td = dict(d["text_config"])
    except KeyError as e:
      raise ConfigError(f"config.json: missing {e.args[0]!r} (not a Qwen3-VL config?)") from None
    rope = td.get("rope_parameters") or td.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
      raise ConfigError(f"config.json: text_config rope type {rope_type!r} unsupported (expected 'default')")
    theta = rope.get("rope_theta", td.get("rope_theta", TextConfig.rope_theta))
    vision_fields = {f.name for f in dataclasses.fields(VisionConfig)} - {"attention_impl"}
    text_fields = {f.name for f in dataclasses.fields(TextConfig)} - {"attention_impl"}
    vkw = {k: vd[k] for k in vision_fields if k in vd}
    if "deepstack_visual_indexes" in vkw:
      vkw["deepstack_visual_indexes"] = tuple(vkw["deepstack_visual_indexes"])
    vrope = vd.get("rope_parameters") or {}
    if "rope_theta" in vrope:
      vkw["rope_theta"] = float(vrope["rope_theta"])
    tkw = {k: td[k] for k in text_fields if k in td and k not in ("rope_theta", "mrope_section",
                                                                  "mrope_interleaved")}
    if tkw.get("head_dim") is None:
      tkw["head_dim"] = td["hidden_size"] // td["num_attention_heads"]
    if tkw.get("num_key_value_heads") is None:
      tkw["num_key_value_heads"] = td["num_attention_heads"]
    tkw["rope_theta"] = float(theta)
    if "mrope_section" in rope:
      tkw["mrope_section"] = tuple(rope["mrope_section"])
    tkw["mrope_interleaved"] = bool(rope.get("mrope_interleaved", True))
    top = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                             "vision_end_token_id") if k in d}
    tie = d.get("tie_word_embeddings", td.get("tie_word_embeddings", False))
    return cls(vision=VisionConfig(**vkw), text=TextConfig(**tkw), tie_word_embeddings=bool(tie), **top)

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF `config.json` dict describing this model, laid out like the released Qwen3-VL configs.

    `vision_config` has the released keys only (model_type "qwen3_vl", no rope entry: its rotary
    base is fixed at 10000; a different `rope_theta` is written as a plain key). `text_config` carries
    the rotary settings in both layouts: `rope_parameters` (transformers 5.x) and `rope_scaling` +
    `rope_theta` (4.x, which the authors' code runs on).
    """
    vd = dataclasses.asdict(self.vision)
    vd["deepstack_visual_indexes"] = list(self.vision.deepstack_visual_indexes)
    vd.pop("layer_norm_eps")
    vd.pop("attention_impl")
    if vd["rope_theta"] == VisionConfig.rope_theta:
      vd.pop("rope_theta")
    vd["model_type"] = "qwen3_vl"
    vd["initializer_range"] = 0.02
    td = dataclasses.asdict(self.text)
    td.pop("attention_impl")
    rope = {"rope_type": "default", "mrope_section": list(td.pop("mrope_section")),
            "mrope_interleaved": td.pop("mrope_interleaved")}
    td["rope_parameters"] = dict(rope, rope_theta=td["rope_theta"])
    td["rope_scaling"] = rope
    td["model_type"] = "qwen3_vl_text"
    td["tie_word_embeddings"] = self.tie_word_embeddings
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "vision_config": vd,
        "text_config": td,
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
    }

  @classmethod
  def from_json_file(cls, path: str | pathlib.Path) -> "Qwen3VLConfig":
    path = pathlib.Path(path)
    try:
      d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f"{path}: cannot read config ({e})") from None
    return cls.from_hf_dict(d)

  # ---------------------------------------------------------------- presets
  @classmethod
  def tiny(cls, vocab_size: int = 151936, deepstack: Sequence[int] = (0, 1, 2),
           tie_word_embeddings: bool = False) -> "Qwen3VLConfig":
    """A tiny random-init model for tests and the CPU default run (real Qwen token ids)."""
    return cls(
        vision=VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                            out_hidden_size=64, num_position_embeddings=256,
                            deepstack_visual_indexes=tuple(deepstack)),
        text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, rope_theta=10000.0, mrope_section=(2, 3, 3),
                        max_position_embeddings=4096),
        tie_word_embeddings=tie_word_embeddings)

  @classmethod
  def qwen3_vl_4b(cls) -> "Qwen3VLConfig":
    """Qwen3-VL-4B-Instruct (the backbone of DepthVLM-4B)."""
    return cls(
        vision=VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                            out_hidden_size=2560, deepstack_visual_indexes=(5, 11, 17)),
        text=TextConfig(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128),
        tie_word_embeddings=True)

  @classmethod
  def qwen3_vl_8b(cls) -> "Qwen3VLConfig":
    """Qwen3-VL-8B-Instruct (the backbone of DepthVLM-8B)."""
    return cls(
        vision=VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                            out_hidden_size=4096, deepstack_visual_indexes=(8, 16, 24)),
        text=TextConfig(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128),
        tie_word_embeddings=False)
