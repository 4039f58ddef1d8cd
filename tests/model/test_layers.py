"""bfloat16 layers sum the gradients of their per-channel parameters (biases, norm scales) in float32.

Such a gradient is the output gradient summed over every position. Summed in bfloat16 (8 significant
bits) a running total of ones stops growing at 256; the layers sum in float32 (`layers.add_bias`,
`layers.scale_by`), so the gradient of 8 maps of 96x128 positions with an output gradient of ones is
98304 = 3 * 2^15 (a bfloat16 value: no rounding either).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthvlm_jax.model.depth_head import Conv2d, PatchConvTranspose
from depthvlm_jax.model.layers import Dense, RMSNorm, add_bias, scale_by

POSITIONS = 8 * 96 * 128
BF16 = dict(dtype=jnp.bfloat16)


@pytest.mark.parametrize("module,name,in_shape", [
    (Dense(8, (None, None), **BF16), "bias", (8, 96, 128, 4)),
    (RMSNorm(**BF16), "scale", (8, 96, 128, 4)),
    (Conv2d(8, 3, **BF16), "bias", (8, 96, 128, 4)),
    (PatchConvTranspose(8, 2, **BF16), "bias", (8, 48, 64, 4)),
], ids=["dense", "rms_norm", "conv", "patch_conv_transpose"])
def test_per_channel_gradient_sums_in_float32(module, name, in_shape):
  x = jnp.ones(in_shape, jnp.float32)
  params = nn.unbox(module.init(jax.random.key(0), x))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32))))(params)
  g = np.asarray(grads["params"][name])
  assert g.dtype == np.float32
  # RMSNorm's normalised ones are 1 / sqrt(1 + eps), which bfloat16 rounds to 1
  np.testing.assert_array_equal(g, np.full(g.shape, POSITIONS, np.float32))


def test_forward_values_are_those_of_the_bfloat16_ops():
  """Combining in float32 the values rounded to bfloat16 and rounding once gives the bfloat16 op's result."""
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.normal(size=(64, 32)), jnp.bfloat16)
  p = jnp.asarray(rng.normal(size=(32,)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(add_bias(y, p, jnp.bfloat16)), np.asarray(y + p.astype(jnp.bfloat16)))
  np.testing.assert_array_equal(np.asarray(scale_by(p, y, jnp.bfloat16)), np.asarray(p.astype(jnp.bfloat16) * y))
