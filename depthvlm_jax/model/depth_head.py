"""DepthVLM depth heads (SPEC §1): the DPT head and the MLP ablation head, plus their key map.

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

Parameter tree <-> official keys (prefix `depth_head.`), one to one:
  norm/{scale,bias}                            norm.{weight,bias}
  projects_i/{kernel,bias}                     projects.i.{weight,bias}               1x1 conv
  resize_layers_i/{kernel,bias}  (i < 3)       resize_layers.i.{weight,bias}          ConvTranspose k=s
  scratch/layerN_rn/kernel                     scratch.layerN_rn.weight               3x3, no bias
  scratch/refinenetN/resConfUnitK/convJ/...    scratch.refinenetN.resConfUnitK.convJ.*
  scratch/refinenetN/out_conv/...              scratch.refinenetN.out_conv.*
  scratch/output_conv1/...                     scratch.output_conv1.*
  scratch/output_conv2_0/..., output_conv2_2   scratch.output_conv2.0.*, .2.*
  MLP head: norm, mlp_0, mlp_2                 norm.*, mlp.0.*, mlp.2.*  (torch Linear)
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from depthvlm_jax.model.hf_params import KeyMapError, flatten, raise_if_mismatched, unflatten
from depthvlm_jax.model.layers import Dense, LayerNorm, logical_init
from depthvlm_jax.model.resize import align_corners_transpose_taps, apply_taps, resize_bilinear_align_corners

Dtype = Any

# torch nn.LayerNorm default; the official head builds `nn.LayerNorm(dim_in)`.
LAYER_NORM_EPS = 1e-5
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
HEAD_TYPES = ("dpt", "mlp")
MLP_FEATURE_MODES = ("llm_last", "concat", "sum")

# HF `PreTrainedModel._init_weights` (run by `post_init`) draws conv / conv-transpose / linear
# weights from N(0, 0.02) and zeros their biases: a fresh official head starts from that.
_kernel_init = nn.initializers.normal(stddev=0.02)
_bias_init = nn.initializers.zeros_init()


# ----------------------------------------------------------------------------- layers
def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'Same' stride-1 convolution, NHWC x (k, k, in, out) kernel, odd k."""
  pad = (kernel.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Below this many output positions XLA's own kernel-gradient convolution is as fast (see `conv3x3`).
FLAT_KERNEL_GRAD_MIN_POSITIONS = 4096


def kernel_grad_3x3(x: jax.Array, g: jax.Array) -> jax.Array:
  """Kernel gradient of the 'same' 3x3 convolution, dK[a, b] = sum_p xpad[p + (a, b)]^T g[p], as one matmul.

  On the zero-padded grid flattened row by row (row length w + 2), tap (a, b) of output position n
  reads input position n + a (w + 2) + b, a plain offset. The three width offsets b are applied to
  the input (side by side: (m, 3C)), the three row offsets a to the output gradient (stacked:
  (3O, m), zero in the grid's padding columns), and a single (3O, m) x (m, 3C) matmul gives all nine
  taps. XLA:CPU runs the autodiff form, a correlation with an (h, w) window and a single input
  feature, far below its matmul speed; slicing one operand per tap instead would copy it each time.

  Args:
    x: (B, h, w, C) convolution input.
    g: (B, h, w, O) output gradient.

  Returns:
    (3, 3, C, O) in the dtype of the product.
  """
  b, h, w, c = x.shape
  row = w + 2
  n = h * row  # output positions on the padded grid (the last two of each row are padding)
  m = n + 2 * row  # positions one operand row offset reaches
  flat = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, (h + 2) * row, c)
  flat = jnp.pad(flat, ((0, 0), (0, 2), (0, 0)))  # the last width offsets run 2 past the end (into zeros of g)
  width_taps = jnp.concatenate([flat[:, j:j + m] for j in range(3)], axis=-1)  # (B, m, 3C)
  g_t = jnp.pad(g, ((0, 0), (0, 0), (0, 2), (0, 0))).reshape(b, n, -1).transpose(0, 2, 1)  # (B, O, n)
  row_taps = jnp.concatenate([jnp.pad(g_t, ((0, 0), (0, 0), (a * row, (2 - a) * row))) for a in range(3)],
                             axis=1)  # (B, 3O, m)
  taps = jnp.einsum("bkm,bmj->kj", row_taps, width_taps)  # (3O, 3C): [(a, o), (b, c)]
  return taps.reshape(3, -1, 3, c).transpose(0, 2, 3, 1)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'Same' 3x3 convolution (B, h, w, C) x (3, 3, C, O) -> (B, h, w, O); for maps of at least
  `FLAT_KERNEL_GRAD_MIN_POSITIONS` positions the kernel gradient is `kernel_grad_3x3`, otherwise
  autodiff's. The value and the input gradient are XLA's convolutions."""
  return _conv_same(x, kernel)


def _conv3x3_fwd(x, kernel):
  return _conv_same(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, g):
  x, kernel = residuals
  if x.shape[1] * x.shape[2] < FLAT_KERNEL_GRAD_MIN_POSITIONS:
    return jax.vjp(_conv_same, x, kernel)[1](g)
  (dx,) = jax.vjp(lambda v: _conv_same(v, kernel), x)[1](g)
  return dx, kernel_grad_3x3(x, g).astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_of_resized(y: jax.Array, kernel: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """`_conv_same(resize_bilinear_align_corners(y, out_hw), kernel)` with both gradients taken at y's size.

  The DPT head's last two 3x3 convs read bilinear upsamples of half-resolution maps. Autodiff
  would form both gradients at the upsampled size: for a 640x480 image a 307200-position kernel
  correlation (which XLA:CPU runs at a third of its forward-conv speed) and a full-size transposed
  convolution whose (H, W, C) result is then resized down again. With x = R y (R the resize, linear
  and separable) and S_t the shift of kernel tap t = (a, b), the forward is sum_t S_t^-1(x) K_t, so
      T_t = R^T S_t g                  (the output gradient shifted and resized *down*: a few gathers)
      dK_t = sum_q y[q]^T T_t[q]       (C, O)
      dy   = sum_t T_t K_t^T           (B, h, w, C)
  Every product runs at y's size. Same values up to float rounding; the upsampled map is not kept
  for the backward pass either.

  Args:
    y: (B, h, w, C) map before the resize.
    kernel: (3, 3, C, O) in y's dtype.
    out_hw: static (H, W) the map is resized to before the convolution.

  Returns:
    (B, H, W, O).
  """
  return _conv_same(resize_bilinear_align_corners(y, out_hw), kernel)


def _conv3x3_of_resized_fwd(y, kernel, out_hw):
  return conv3x3_of_resized(y, kernel, out_hw), (y, kernel)


def _conv3x3_of_resized_bwd(out_hw, residuals, g):
  y, kernel = residuals
  (h_in, w_in), (h_out, w_out) = y.shape[1:3], out_hw
  dk = [[None] * 3 for _ in range(3)]
  dy = None
  for b in range(3):  # width first: it shrinks the array the three height passes read
    g_b = apply_taps(g, align_corners_transpose_taps(w_in, w_out, 1 - b), axis=2)  # (B, H, w, O)
    for a in range(3):
      t = apply_taps(g_b, align_corners_transpose_taps(h_in, h_out, 1 - a), axis=1)  # T_ab: (B, h, w, O)
      dk[a][b] = jnp.einsum("bhwc,bhwo->co", y, t)
      term = jnp.einsum("bhwo,co->bhwc", t, kernel[a, b])
      dy = term if dy is None else dy + term
  return dy.astype(y.dtype), jnp.stack([jnp.stack(row) for row in dk]).astype(kernel.dtype)


conv3x3_of_resized.defvjp(_conv3x3_of_resized_fwd, _conv3x3_of_resized_bwd)


class Conv2d(nn.Module):
  """Square 'same' 2-D convolution, NHWC; kernel (k, k, in, out) = torch OIHW transposed (2,3,1,0).

  With `resize_input_to`, the input is first resized (bilinear, align_corners=True) to that size;
  3x3 convs then use `conv3x3_of_resized`.
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
    if size is not None and size != x.shape[1:3] and k == 3:
      y = conv3x3_of_resized(x, kernel, size)
    else:
      if size is not None:
        x = resize_bilinear_align_corners(x, size)
      y = jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0]) if k == 1 else (
          conv3x3(x, kernel) if k == 3 else _conv_same(x, kernel))
    if self.use_bias:
      bias = self.param("bias", logical_init(_bias_init, ("conv_out",)), (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
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
    return y.reshape(b, h * s, w * s, self.features) + bias.astype(self.dtype)


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
  """DPT metric-depth head of DepthVLM (SPEC §1).

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
  """MLP ablation head: each token predicts its own patch x patch depth patch (SPEC §1).

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


# ----------------------------------------------------------------------------- key map
# (regex over the official key without the `depth_head.` prefix, kind). First match wins; a key
# that matches no rule is unexpected, never guessed.
_KEY_RULES: list[tuple[re.Pattern, str]] = [(re.compile(p), k) for p, k in [
    (r"^norm\.weight$", "norm"),
    (r"^resize_layers\.[0-2]\.weight$", "conv_transpose"),
    (r"^mlp\.[02]\.weight$", "linear"),
    (r"^projects\.[0-3]\.weight$", "conv"),
    (r"^scratch\.layer[1-4]_rn\.weight$", "conv"),
    (r"^scratch\.refinenet[1-4]\.(resConfUnit[12]\.conv[12]|out_conv)\.weight$", "conv"),
    (r"^scratch\.output_conv1\.weight$", "conv"),
    (r"^scratch\.output_conv2\.[02]\.weight$", "conv"),
    (r"^(norm|projects\.[0-3]|resize_layers\.[0-2]|mlp\.[02]|scratch\.(output_conv1|output_conv2\.[02]|"
     r"refinenet[1-4]\.(resConfUnit[12]\.conv[12]|out_conv)))\.bias$", "bias"),
]]

# Flax leaf name for each kind, and torch -> flax / flax -> torch array transforms.
_LEAF = {"norm": "scale", "conv": "kernel", "conv_transpose": "kernel", "linear": "kernel", "bias": "bias"}
_TO_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda t: t.transpose(2, 3, 1, 0),  # OIHW -> HWIO
    "conv_transpose": lambda t: t.transpose(2, 3, 0, 1),  # (I, O, kh, kw) -> (kh, kw, I, O)
    "linear": lambda t: t.T,  # (out, in) -> (in, out)
    "norm": lambda t: t,
    "bias": lambda t: t,
}
_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "conv_transpose": lambda a: a.transpose(2, 3, 0, 1),
    "linear": lambda a: a.T,
    "norm": lambda a: a,
    "bias": lambda a: a,
}
_INDEXED = re.compile(r"^(projects|resize_layers|mlp|output_conv2)\.(\d+)$")


def key_kind(key: str) -> str | None:
  """Kind of an official head key (without prefix), or None if no rule covers it."""
  for pattern, kind in _KEY_RULES:
    if pattern.search(key):
      return kind
  return None


def torch_key_to_path(key: str) -> tuple[tuple[str, ...], str] | None:
  """Official key (without prefix) -> (Flax path, kind); None for a key no rule covers."""
  kind = key_kind(key)
  if kind is None:
    return None
  parts = key.split(".")[:-1]
  merged: list[str] = []
  for p in parts:  # "projects", "0" -> "projects_0"
    if p.isdigit() and merged and _INDEXED.match(f"{merged[-1]}.{p}"):
      merged[-1] = f"{merged[-1]}_{p}"
    else:
      merged.append(p)
  return tuple(merged) + (_LEAF[kind],), kind


def path_to_torch_key(path: tuple[str, ...]) -> str:
  """Flax path -> official key (without prefix). Inverse of `torch_key_to_path`."""
  *mods, leaf = path
  mods = [re.sub(r"^(projects|resize_layers|mlp|output_conv2)_(\d+)$", r"\1.\2", m) for m in mods]
  return ".".join(mods + ["bias" if leaf == "bias" else "weight"])


def depth_head_key_map(params: Mapping[str, Any], prefix: str = "depth_head.") -> dict[str, tuple[tuple[str, ...], str]]:
  """{official key: (Flax path, kind)} for every leaf of a head parameter tree.

  Kinds and transforms (torch -> Flax): conv OIHW -> HWIO; conv_transpose (I, O, kh, kw) ->
  (kh, kw, I, O); linear (out, in) -> (in, out); norm weight -> scale; bias unchanged.
  """
  out = {}
  for path in flatten(nn.unbox(params)):
    key = path_to_torch_key(path)
    mapped = torch_key_to_path(key)
    if mapped is None or mapped[0] != path:
      raise KeyMapError(f"Flax parameter {'/'.join(path)} has no official depth-head key (got {key!r})")
    out[prefix + key] = mapped
  return out


def _to_numpy(t: Any) -> np.ndarray:
  if hasattr(t, "detach"):  # torch tensor (bf16 has no numpy dtype: go through float32)
    t = t.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      t = t.float()
    return t.numpy()
  return np.asarray(t)


def infer_depth_head(state_dict: Mapping[str, Any], prefix: str = "depth_head.") -> nn.Module:
  """A head whose parameter shapes follow the checkpoint (type, widths) for `expected=None`."""
  shape = lambda k: tuple(_to_numpy(state_dict[prefix + k]).shape) if prefix + k in state_dict else None
  if shape("norm.weight") is None:
    raise KeyMapError(f"no {prefix}norm.weight in the state dict: cannot infer the depth head")
  c = shape("norm.weight")[0]
  if shape("mlp.0.weight") is not None and shape("mlp.2.weight") is not None:
    hidden, patch2 = shape("mlp.0.weight")[0], shape("mlp.2.weight")[0]
    patch = int(round(patch2 ** 0.5))
    return MLPDepthHead(c, "llm_last", mlp_hidden=hidden, patch=patch)
  outs = [shape(f"projects.{i}.weight") for i in range(4)]
  f = shape("scratch.layer1_rn.weight")
  h2 = shape("scratch.output_conv2.0.weight")
  if any(o is None for o in outs) or f is None or h2 is None:
    raise KeyMapError(f"state dict has neither a complete DPT nor an MLP depth head under {prefix!r}")
  return DPTDepthHead(c, features=f[0], out_channels=tuple(o[0] for o in outs), head_features=h2[0])


def abstract_head_params(head: nn.Module, grid: tuple[int, int] = (1, 1)):
  """Shape/dtype tree of a head's parameters (no allocation)."""
  x = jax.ShapeDtypeStruct((1, *grid, head.hidden_size), jnp.float32)
  return jax.eval_shape(lambda xs: nn.unbox(head.init(jax.random.key(0), xs)["params"]), [x] * 4)


def torch_state_dict_to_flax(state_dict: Mapping[str, Any] | Iterable[tuple[str, Any]], expected: Any = None, *,
                             prefix: str = "depth_head.", ignore_other_keys: bool = False,
                             place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None) -> dict[str, Any]:
  """Official depth-head tensors -> our Flax parameter tree.

  Args:
    state_dict: mapping or iterable of (key, tensor); torch tensors or numpy arrays.
    expected: target tree of arrays / ShapeDtypeStructs (e.g. `abstract_head_params(head)`); None
      infers the head from the state dict (`infer_depth_head`). Arrays are cast to its dtypes.
    prefix: key prefix of the head ("depth_head." in the full checkpoint, "" for a bare head).
    ignore_other_keys: skip keys outside `prefix` (a full-model checkpoint) instead of reporting them.
    place: optional (path, np.ndarray) -> array hook (device placement / sharding).

  Raises:
    KeyMapError: listing every unexpected key, shape mismatch and unfilled parameter together.
  """
  items = list(state_dict.items()) if isinstance(state_dict, Mapping) else list(state_dict)
  if expected is None:
    head = infer_depth_head(dict(items), prefix)
    expected = abstract_head_params(head)
  want = flatten(nn.unbox(expected))
  got: dict[tuple[str, ...], Any] = {}
  unexpected, mismatched = [], []
  for key, tensor in items:
    if not key.startswith(prefix):
      if not ignore_other_keys:
        unexpected.append(key)
      continue
    mapped = torch_key_to_path(key[len(prefix):])
    if mapped is None or mapped[0] not in want:
      unexpected.append(key)
      continue
    path, kind = mapped
    t = _to_numpy(tensor)
    arr = _TO_FLAX[kind](t)
    target = want[path]
    if tuple(arr.shape) != tuple(target.shape):
      mismatched.append(f"{key}: checkpoint {tuple(t.shape)} -> {tuple(arr.shape)}, model expects "
                        f"{tuple(target.shape)} at {'/'.join(path)}")
      continue
    arr = np.asarray(arr).astype(target.dtype)
    got[path] = place(path, arr) if place else jnp.asarray(arr)
  missing = [f"{prefix}{path_to_torch_key(p)} ({'/'.join(p)})" for p in want if p not in got]
  raise_if_mismatched("depth-head state dict does not match the model", unexpected, mismatched, missing)
  return unflatten(got)


def flax_to_torch_state_dict(params: Mapping[str, Any], prefix: str = "depth_head.") -> dict[str, np.ndarray]:
  """Our head parameter tree -> {official key: numpy array in torch layout} (exact inverse)."""
  flat = flatten(nn.unbox(params))
  return {key: np.ascontiguousarray(_TO_TORCH[kind](np.asarray(flat[path])))
          for key, (path, kind) in depth_head_key_map(params, prefix).items()}
