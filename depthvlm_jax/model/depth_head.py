"""DepthVLM depth heads: the DPT head and the MLP ablation head.

Both heads read four token-feature maps of one image grid, in this order: DeepStack merger outputs
0, 1, 2 and the LLM's last hidden states (after the final norm) at the image tokens, each
(B, h, w, C) with C = LLM hidden size; (h, w) is the token grid, one token = 32 x 32 pixels.
Layout is NHWC throughout; parameters carry logical axis names (see `depthvlm_jax/sharding.py`).

Reference: hanxunyu/DepthVLM `qwen3_vl/dpt_depth_head.py` (`DPTDepthHead`) and the MLP ablation
head selected by `depth_head_type == "mlp"` in `qwen3_vl/modeling_qwen3_vl.py`. Facts kept from it:
  * the input LayerNorm is torch's default (eps 1e-5), one module shared by all four inputs;
  * `ResidualConvUnit` uses `nn.ReLU(inplace=True)` on its input, so the residual branch adds
    relu(x), not x:  out = relu(x) + conv2(relu(conv1(relu(x)))).  We reproduce that exactly;
  * every conv has a bias except `scratch.layer{1..4}_rn`;
  * all upsampling is bilinear with align_corners=True (`refinenet1` doubles the size);
  * the MLP head applies Softplus *after* the optional resize to `output_size`.

Parameter tree <-> official `depth_head.*` keys: rows of the one conversion table in
`depthvlm_jax/model/hf_params.py`. The CPU-fast 3x3 convolution gradients are in `cpu_kernels.py`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from depthvlm_jax.model import hf_params
from depthvlm_jax.model.cpu_kernels import conv3x3, conv3x3_of_resized, conv_same
from depthvlm_jax.model.layers import Dense, LayerNorm, abstract_params, add_bias, compile_target, logical_init
from depthvlm_jax.model.resize import resize_bilinear_align_corners

Dtype = Any

# torch nn.LayerNorm default; the official head builds `nn.LayerNorm(dim_in)`.
LAYER_NORM_EPS = 1e-5
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
HEAD_TYPES = ("dpt", "mlp")
MLP_FEATURE_MODES = ("llm_last", "concat", "sum")

# Compile targets (`sharding.compile_target`) whose 3x3 convolutions take the hand-written gradients of
# `cpu_kernels`: `conv3x3` (the kernel gradient as one matmul) pays off on XLA:CPU only;
# `conv3x3_of_resized` (both gradients at the small map's size) where measured ahead. Elsewhere
# autodiff's convolutions.
FLAT_KERNEL_GRAD_PLATFORMS = ("cpu",)
RESIZED_CONV_PLATFORMS = ("cpu",)

# HF `PreTrainedModel._init_weights` (run by `post_init`) draws conv / conv-transpose / linear
# weights from N(0, 0.02) and zeros their biases: a fresh official head starts from that.
_kernel_init = nn.initializers.normal(stddev=0.02)
_bias_init = nn.initializers.zeros_init()


# ----------------------------------------------------------------------------- layers
class Conv2d(nn.Module):
  """Square 'same' 2-D convolution, NHWC; kernel (k, k, in, out) = torch OIHW transposed (2,3,1,0).

  With `resize_input_to`, the input is first resized (bilinear, align_corners=True) to that size.
  3x3 convs take the CPU kernels' gradients when the compile target is listed in
  `FLAT_KERNEL_GRAD_PLATFORMS` / `RESIZED_CONV_PLATFORMS`.
  """

  features: int
  kernel_size: int = 3
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  resize_input_to: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C_in) -> (B, H', W', features); (H', W') = `resize_input_to` or (H, W)."""
    k = self.kernel_size
    kernel = self.param("kernel", logical_init(_kernel_init, CONV_AXES), (k, k, x.shape[-1], self.features),
                        self.param_dtype).astype(self.dtype)
    x = x.astype(self.dtype)
    size = tuple(int(s) for s in self.resize_input_to) if self.resize_input_to is not None else None
    target = compile_target()
    if size is not None and size != x.shape[1:3] and k == 3 and target in RESIZED_CONV_PLATFORMS:
      y = conv3x3_of_resized(x, kernel, size)
    else:
      if size is not None:
        x = resize_bilinear_align_corners(x, size)
      y = jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0]) if k == 1 else (
          conv3x3(x, kernel) if k == 3 and target in FLAT_KERNEL_GRAD_PLATFORMS else conv_same(x, kernel))
    if self.use_bias:
      bias = self.param("bias", logical_init(_bias_init, ("conv_out",)), (self.features,), self.param_dtype)
      y = add_bias(y, bias, self.dtype)
    return y


class PatchConvTranspose(nn.Module):
  """ConvTranspose2d with kernel_size == stride == `factor`, padding 0 (non-overlapping patches).

  Each input pixel writes its own (factor x factor) output patch, so the layer is one einsum and a
  reshape: y[b, i*s+p, j*s+q, o] = sum_c x[b, i, j, c] * kernel[p, q, c, o] + bias[o]. No kernel
  flip is involved; kernel (s, s, in, out) = torch weight (in, out, s, s) transposed (2, 3, 0, 1).
  """

  features: int
  factor: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, h, w, C_in) -> (B, factor*h, factor*w, features)."""
    s = self.factor
    kernel = self.param("kernel", logical_init(_kernel_init, CONV_AXES), (s, s, x.shape[-1], self.features),
                        self.param_dtype).astype(self.dtype)
    bias = self.param("bias", logical_init(_bias_init, ("conv_out",)), (self.features,), self.param_dtype)
    b, h, w, _ = x.shape
    y = jnp.einsum("bijc,pqco->bipjqo", x.astype(self.dtype), kernel)
    return add_bias(y.reshape(b, h * s, w * s, self.features), bias, self.dtype)


class ResidualConvUnit(nn.Module):
  """out = relu(x) + conv2(relu(conv1(relu(x)))) (official in-place ReLU semantics; 3x3 convs with bias)."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, F) -> (B, H, W, F)."""
    conv = lambda name: Conv2d(self.features, 3, True, self.dtype, self.param_dtype, name=name)
    x = nn.relu(x)  # in place in the reference, so the residual below adds relu(x)
    out = conv("conv2")(nn.relu(conv("conv1")(x)))
    return out + x


class FeatureFusionBlock(nn.Module):
  """RefineNet fusion: [+ resConfUnit1(skip)] -> resConfUnit2 -> bilinear upsample -> 1x1 out_conv.

  The 1x1 `out_conv` runs before the upsample here: both are linear and bilinear weights sum to 1,
  so the result is the same (bias included) at a quarter of the conv's cost.
  """

  features: int
  has_residual: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None, size: tuple[int, int] | None = None,
               upsample: bool = True) -> jax.Array:
    """Fuses the deeper path `x` (B, h, w, F) with `skip` (B, h, w, F); returns (B, *size, F).

    `size` defaults to (2h, 2w) (torch `scale_factor=2`, which with align_corners=True is the same
    as asking for that size). upsample=False returns the (B, h, w, F) map before the upsample, for
    a caller that folds the upsample into its next conv.
    """
    rcu = lambda name: ResidualConvUnit(self.features, self.dtype, self.param_dtype, name=name)
    if self.has_residual:
      if skip is None:
        raise ValueError("this fusion block has a residual input: pass `skip`")
      x = x + rcu("resConfUnit1")(skip)
    x = rcu("resConfUnit2")(x)
    x = Conv2d(self.features, 1, True, self.dtype, self.param_dtype, name="out_conv")(x)
    if not upsample:
      return x
    return resize_bilinear_align_corners(x, size or (2 * x.shape[1], 2 * x.shape[2]))


class DPTScratch(nn.Module):
  """The official `scratch` container: channel unification, bottom-up fusion and output convs."""

  features: int = 256
  head_features: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pyramid: Sequence[jax.Array], output_size: tuple[int, int]) -> jax.Array:
    """Pyramid maps at (8h, 4h, 2h, h) -> depth (B, *output_size) in float32 metres.

    Args:
      pyramid: 4 arrays (B, 8h, 8w, c0), (B, 4h, 4w, c1), (B, 2h, 2w, c2), (B, h, w, c3).
      output_size: static (H, W) of the depth map.
    """
    f, dt, pdt = self.features, self.dtype, self.param_dtype
    rn = [Conv2d(f, 3, False, dt, pdt, name=f"layer{i + 1}_rn")(x) for i, x in enumerate(pyramid)]
    fusion = lambda i, res: FeatureFusionBlock(f, res, dt, pdt, name=f"refinenet{i}")
    size = lambda x: (x.shape[1], x.shape[2])
    out = fusion(4, False)(rn[3], size=size(rn[2]))  # (B, 2h, 2w, F)
    out = fusion(3, True)(out, rn[2], size=size(rn[1]))  # (B, 4h, 4w, F)
    out = fusion(2, True)(out, rn[1], size=size(rn[0]))  # (B, 8h, 8w, F)
    out = fusion(1, True)(out, rn[0], upsample=False)  # (B, 8h, 8w, F), upsampled x2 by output_conv1
    twice = (2 * out.shape[1], 2 * out.shape[2])
    out = Conv2d(f // 2, 3, True, dt, pdt, twice, name="output_conv1")(out)  # (B, 16h, 16w, F/2)
    # bilinear resize to the full (H, W), then the conv
    out = nn.relu(Conv2d(self.head_features, 3, True, dt, pdt, output_size, name="output_conv2_0")(out))
    out = Conv2d(1, 1, True, dt, pdt, name="output_conv2_2")(out)  # (B, H, W, 1)
    return nn.softplus(out[..., 0].astype(jnp.float32))


# ----------------------------------------------------------------------------- heads
def _check_features(features: Sequence[jax.Array]) -> tuple[int, int]:
  if len(features) != 4:
    raise ValueError(f"the depth head takes 4 feature maps (3 DeepStack + LLM last), got {len(features)}")
  shapes = {tuple(x.shape) for x in features}
  if len(shapes) != 1 or len(features[0].shape) != 4:
    raise ValueError(f"the 4 feature maps must share one (B, h, w, C) shape, got {sorted(shapes)}")
  return features[0].shape[1], features[0].shape[2]


class DPTDepthHead(nn.Module):
  """DPT metric-depth head of DepthVLM.

  Attributes:
    hidden_size: C, the LLM hidden size (= DeepStack merger output size).
    features: fusion width (256 in the official head).
    out_channels: widths of the four projections (256, 512, 1024, 1024).
    head_features: width of `output_conv2.0` (32 in the official head).
    dtype: compute dtype (LayerNorm and the final Softplus run in float32).
    param_dtype: parameter dtype.
  """

  hidden_size: int
  features: int = 256
  out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
  head_features: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], output_size: tuple[int, int] | None = None) -> jax.Array:
    """Depth from the four token maps.

    Args:
      features: 4 arrays (B, h, w, C): DeepStack 0, 1, 2 and LLM last hidden states.
      output_size: static (H, W); default (32h, 32w), the processed-image resolution.

    Returns:
      (B, H, W) float32 depth in metres (> 0).
    """
    h, w = _check_features(features)
    if features[0].shape[-1] != self.hidden_size:
      raise ValueError(f"feature size {features[0].shape[-1]} != hidden_size {self.hidden_size}")
    output_size = (32 * h, 32 * w) if output_size is None else tuple(int(s) for s in output_size)
    norm = LayerNorm(eps=LAYER_NORM_EPS, axis_name="embed", dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")
    factors = (8, 4, 2, 1)
    pyramid = []
    for i, (x, oc) in enumerate(zip(features, self.out_channels)):
      x = Conv2d(oc, 1, True, self.dtype, self.param_dtype, name=f"projects_{i}")(norm(x))  # (B, h, w, oc)
      if factors[i] > 1:
        x = PatchConvTranspose(oc, factors[i], self.dtype, self.param_dtype, name=f"resize_layers_{i}")(x)
      pyramid.append(x)
    return DPTScratch(self.features, self.head_features, self.dtype, self.param_dtype,
                      name="scratch")(pyramid, output_size)


class MLPDepthHead(nn.Module):
  """MLP ablation head: each token predicts its own patch x patch depth patch.

  LayerNorm(C_in) -> Linear(C_in, mlp_hidden) -> GELU (exact erf, torch `nn.GELU()`) ->
  Linear(mlp_hidden, patch**2) -> patches tiled to (B, patch*h, patch*w) -> optional bilinear
  (align_corners=True) resize to `output_size` -> Softplus.

  Attributes:
    hidden_size: C, the LLM hidden size.
    feature_mode: "llm_last" (input 3 only), "concat" (C_in = 4C) or "sum" of the 4 inputs.
    mlp_hidden: hidden width (official config `depth_head_mlp_hidden`, default 1024).
    patch: pixels per token side (vision patch 16 x spatial merge 2 = 32).
  """

  hidden_size: int
  feature_mode: str = "llm_last"
  mlp_hidden: int = 1024
  patch: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], output_size: tuple[int, int] | None = None) -> jax.Array:
    """4 arrays (B, h, w, C) -> (B, H, W) float32 depth; default (H, W) = (patch*h, patch*w)."""
    if self.feature_mode not in MLP_FEATURE_MODES:
      raise ValueError(f"feature_mode={self.feature_mode!r}; expected one of {MLP_FEATURE_MODES}")
    h, w = _check_features(features)
    if features[0].shape[-1] != self.hidden_size:
      raise ValueError(f"feature size {features[0].shape[-1]} != hidden_size {self.hidden_size}")
    if self.feature_mode == "llm_last":
      x = features[3]
    elif self.feature_mode == "concat":
      x = jnp.concatenate(list(features), axis=-1)  # (B, h, w, 4C)
    else:
      x = features[0] + features[1] + features[2] + features[3]
    x = LayerNorm(eps=LAYER_NORM_EPS, axis_name="embed", dtype=self.dtype, param_dtype=self.param_dtype,
                  name="norm")(x)
    x = Dense(self.mlp_hidden, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_0")(x)
    x = nn.gelu(x, approximate=False)
    p = self.patch
    x = Dense(p * p, ("mlp", "depth_patch"), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_2")(x)
    b = x.shape[0]
    x = x.reshape(b, h, w, p, p).transpose(0, 1, 3, 2, 4).reshape(b, h * p, w * p)  # (B, ph, pw)
    if output_size is not None and tuple(output_size) != (h * p, w * p):
      x = resize_bilinear_align_corners(x[..., None], tuple(output_size))[..., 0]
    return nn.softplus(x.astype(jnp.float32))


def make_depth_head(head_type: str, hidden_size: int, **kw) -> nn.Module:
  """The depth head named by the official config's `depth_head_type` ("dpt" | "mlp").

  Keyword arguments go to the head's constructor (dtype, param_dtype, ...). The MLP-only options
  `feature_mode` and `mlp_hidden` are accepted and ignored for "dpt", so callers can pass one set.
  """
  if head_type == "dpt":
    kw.pop("feature_mode", None)
    kw.pop("mlp_hidden", None)
    return DPTDepthHead(hidden_size, **kw)
  if head_type == "mlp":
    return MLPDepthHead(hidden_size, **kw)
  raise ValueError(f"unknown depth head type {head_type!r}; expected one of {HEAD_TYPES}")


# ----------------------------------------------------------------------------- official checkpoints
def infer_depth_head(state_dict: Mapping[str, Any], prefix: str = "depth_head.") -> nn.Module:
  """A head whose parameter shapes follow the checkpoint (type, widths) for `expected=None`."""
  shape = lambda k: tuple(np.shape(state_dict[prefix + k])) if prefix + k in state_dict else None
  if shape("norm.weight") is None:
    raise hf_params.KeyMapError(f"no {prefix}norm.weight in the state dict: cannot infer the depth head")
  c = shape("norm.weight")[0]
  if shape("mlp.0.weight") is not None and shape("mlp.2.weight") is not None:
    hidden, patch2 = shape("mlp.0.weight")[0], shape("mlp.2.weight")[0]
    patch = int(round(patch2 ** 0.5))
    return MLPDepthHead(c, "llm_last", mlp_hidden=hidden, patch=patch)
  outs = [shape(f"projects.{i}.weight") for i in range(4)]
  f = shape("scratch.layer1_rn.weight")
  h2 = shape("scratch.output_conv2.0.weight")
  if any(o is None for o in outs) or f is None or h2 is None:
    raise hf_params.KeyMapError(f"state dict has neither a complete DPT nor an MLP depth head under {prefix!r}")
  return DPTDepthHead(c, features=f[0], out_channels=tuple(o[0] for o in outs), head_features=h2[0])


def abstract_head_params(head: nn.Module, grid: tuple[int, int] = (1, 1)):
  """Shape/dtype tree of a head's parameters (no allocation)."""
  x = np.zeros((1, *grid, head.hidden_size), np.float32)  # concrete and tiny: init is only traced
  return abstract_params(head, [x] * 4)


def torch_state_dict_to_flax(state_dict: Mapping[str, Any], expected: Any = None, **kw) -> dict[str, Any]:
  """Official depth-head tensors -> our head tree, through `hf_params.depth_head_to_params` (keyword
  arguments go there); expected=None infers the head from the state dict (`infer_depth_head`)."""
  if expected is None:
    expected = abstract_head_params(infer_depth_head(state_dict, kw.get("prefix", "depth_head.")))
  return hf_params.depth_head_to_params(state_dict, expected, **kw)
