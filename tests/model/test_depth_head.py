"""Depth heads and their key map against PyTorch references written here from the paper's description.

The references use the official key names (hanxunyu/DepthVLM `depth_head.*`) and the official
in-place ReLU of the residual conv unit; they are our own code, not the reference's.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthvlm_jax.torch_export import DPTDepthHead as TorchDPT, MLPDepthHead as TorchMLP
from depthvlm_jax.torch_export import ResidualConvUnit as TorchRCU

from depthvlm_jax.model.depth_head import (DPTDepthHead, MLPDepthHead, abstract_head_params, make_depth_head,
                                           torch_state_dict_to_flax)
from depthvlm_jax.model.hf_params import KeyMapError, depth_head_key_map
from depthvlm_jax.model.hf_params import depth_head_to_torch as flax_to_torch_state_dict
from depthvlm_jax.model import resize
from depthvlm_jax.model.resize import resize_bilinear_align_corners

C = 64  # small LLM hidden size
SMALL = dict(features=32, out_channels=(16, 32, 48, 64), head_features=8)


# ----------------------------------------------------------------------------- torch references
# The PyTorch heads live in depthvlm_jax/torch_export.py (shipped for export).
class Wrapper(torch.nn.Module):
  """Gives the reference head the official `depth_head.` prefix."""

  def __init__(self, head):
    super().__init__()
    self.depth_head = head


def randomize(module, seed):
  """Random weights with O(1) activations everywhere (torch default init plus random norms/biases)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel() if "resize_layers" not in name else p.shape[0]
        p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
  return module


def random_features(b, h, w, seed):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(b, h, w, C)).astype(np.float32) * (1 + i) for i in range(4)]


def run_torch(head, feats, output_size=None):
  b, h, w, _ = feats[0].shape
  with torch.no_grad():
    return head([torch.from_numpy(f.reshape(b, h * w, C)) for f in feats], h, w, output_size).numpy()


def max_rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b)))


# ----------------------------------------------------------------------------- DPT parity
@pytest.fixture(scope="module")
def small_dpt():
  ref = randomize(Wrapper(TorchDPT(C, **SMALL)).eval(), seed=0)
  params = torch_state_dict_to_flax(ref.state_dict())
  return ref, params


@pytest.mark.parametrize("grid,output_size", [((3, 4), None), ((5, 3), None), ((3, 4), (70, 150))])
def test_dpt_matches_torch(small_dpt, grid, output_size):
  ref, params = small_dpt
  feats = random_features(2, *grid, seed=sum(grid))
  want = run_torch(ref.depth_head, feats, output_size)
  head = DPTDepthHead(C, **SMALL)
  got = jax.jit(lambda p, x: head.apply({"params": p}, x, output_size=output_size))(params, [jnp.asarray(f) for f in feats])
  expected_hw = output_size or (32 * grid[0], 32 * grid[1])
  assert got.shape == (2, *expected_hw) and got.dtype == jnp.float32
  assert want.std() > 0.05  # a non-trivial map
  assert max_rel_err(got, want) < 1e-5


@pytest.mark.slow
def test_dpt_default_widths_match_torch():
  ref = randomize(Wrapper(TorchDPT(C)).eval(), seed=1)
  params = torch_state_dict_to_flax(ref.state_dict())
  feats = random_features(1, 2, 3, seed=7)
  got = DPTDepthHead(C).apply({"params": params}, [jnp.asarray(f) for f in feats])
  assert max_rel_err(got, run_torch(ref.depth_head, feats)) < 1e-5


def test_in_place_relu_matters(small_dpt):
  """The official residual adds relu(x); a plain `+ x` gives a different map (guards the quirk)."""
  ref, _ = small_dpt
  feats = random_features(1, 3, 4, seed=3)
  want = run_torch(ref.depth_head, feats)
  for m in ref.modules():
    if isinstance(m, TorchRCU):
      m.act = torch.nn.ReLU(inplace=False)
  try:
    assert max_rel_err(run_torch(ref.depth_head, feats), want) > 1e-3
  finally:
    for m in ref.modules():
      if isinstance(m, TorchRCU):
        m.act = torch.nn.ReLU(inplace=True)


def test_official_key_names_and_round_trip(small_dpt):
  ref, params = small_dpt
  sd = flax_to_torch_state_dict(params)
  torch_sd = ref.state_dict()
  assert set(sd) == set(torch_sd)
  for k, v in torch_sd.items():
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
  for k in ("depth_head.norm.weight", "depth_head.projects.0.bias", "depth_head.resize_layers.2.weight",
            "depth_head.scratch.layer4_rn.weight", "depth_head.scratch.refinenet1.resConfUnit1.conv1.weight",
            "depth_head.scratch.refinenet4.out_conv.bias", "depth_head.scratch.output_conv2.2.weight"):
    assert k in sd
  assert not any("refinenet4.resConfUnit1" in k or "layer1_rn.bias" in k for k in sd)
  back = torch_state_dict_to_flax(sd, abstract_head_params(DPTDepthHead(C, **SMALL)))
  same = jax.tree.map(lambda a, b: a.dtype == b.dtype and bool(np.array_equal(a, b)), params, back)
  assert all(jax.tree.leaves(same))
  kmap = depth_head_key_map(params)
  assert kmap["depth_head.scratch.output_conv2.0.weight"] == (("scratch", "output_conv2_0", "kernel"), "conv")
  assert kmap["depth_head.resize_layers.0.weight"] == (("resize_layers_0", "kernel"), "conv_transpose")
  assert kmap["depth_head.norm.weight"] == (("norm", "scale"), "norm")


def test_converter_reports_all_problems_together(small_dpt):
  ref, _ = small_dpt
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  del sd["depth_head.scratch.refinenet2.resConfUnit2.conv1.bias"]
  sd["depth_head.scratch.refinenet4.resConfUnit1.conv1.weight"] = np.zeros((32, 32, 3, 3), np.float32)
  sd["depth_head.extra.weight"] = np.zeros(3, np.float32)
  sd["depth_head.projects.1.weight"] = np.zeros((32, C + 1, 1, 1), np.float32)
  sd["model.visual.blocks.0.norm1.weight"] = np.zeros(3, np.float32)
  with pytest.raises(KeyMapError) as e:
    torch_state_dict_to_flax(sd, abstract_head_params(DPTDepthHead(C, **SMALL)))
  msg = str(e.value)
  for k in ("refinenet2.resConfUnit2.conv1.bias", "refinenet4.resConfUnit1.conv1.weight", "depth_head.extra.weight",
            "projects.1.weight", "model.visual.blocks.0.norm1.weight"):
    assert k in msg, k
  # A full-model checkpoint: backbone keys may be skipped on request, head problems still reported.
  with pytest.raises(KeyMapError) as e:
    torch_state_dict_to_flax(sd, abstract_head_params(DPTDepthHead(C, **SMALL)), ignore_other_keys=True)
  assert "model.visual" not in str(e.value) and "projects.1.weight" in str(e.value)


def test_bf16_compute_fp32_params(small_dpt):
  _, params = small_dpt
  feats = [jnp.asarray(f) for f in random_features(1, 2, 2, seed=5)]
  want = jax.jit(DPTDepthHead(C, **SMALL).apply)({"params": params}, feats)
  head = DPTDepthHead(C, **SMALL, dtype=jnp.bfloat16)
  got = jax.jit(head.apply)({"params": params}, [f.astype(jnp.bfloat16) for f in feats])
  assert got.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got)))
  assert float(jnp.median(jnp.abs(got - want) / want)) < 0.05
  fresh = jax.eval_shape(lambda x: nn.unbox(head.init(jax.random.key(0), x)["params"]), feats)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fresh))


def test_logical_axis_names():
  x = [jax.ShapeDtypeStruct((1, 1, 1, C), jnp.float32)] * 4
  boxed = jax.eval_shape(lambda x: DPTDepthHead(C, **SMALL).init(jax.random.key(0), x)["params"], x)
  names = {"/".join(str(k.key) for k in path): leaf.names
           for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
  assert names["norm/scale"] == ("embed",)
  assert names["projects_0/kernel"] == ("conv_height", "conv_width", "conv_in", "conv_out")
  assert names["scratch/refinenet1/out_conv/bias"] == ("conv_out",)
  assert all(isinstance(v, tuple) for v in names.values())
  mlp = jax.eval_shape(lambda x: MLPDepthHead(C).init(jax.random.key(0), x)["params"], x)
  assert mlp["mlp_0"]["kernel"].names == ("embed", "mlp") and mlp["mlp_2"]["kernel"].names == ("mlp", "depth_patch")


# ----------------------------------------------------------------------------- MLP head
@pytest.mark.parametrize("mode,grid,output_size", [("llm_last", (3, 4), None), ("concat", (2, 3), (50, 70)),
                                                   ("sum", (3, 2), (96, 64))])
def test_mlp_matches_torch(mode, grid, output_size):
  ref = randomize(Wrapper(TorchMLP(C, mode, hidden=96, patch=32)).eval(), seed=2)
  params = torch_state_dict_to_flax(ref.state_dict(), abstract_head_params(MLPDepthHead(C, mode, mlp_hidden=96)))
  feats = random_features(2, *grid, seed=11)
  got = MLPDepthHead(C, mode, mlp_hidden=96).apply({"params": params}, [jnp.asarray(f) for f in feats],
                                                   output_size=output_size)
  want = run_torch(ref.depth_head, feats, output_size)
  assert got.shape == want.shape
  assert max_rel_err(got, want) < 1e-5
  sd = flax_to_torch_state_dict(params)
  assert set(sd) == {"depth_head.norm.weight", "depth_head.norm.bias", "depth_head.mlp.0.weight",
                     "depth_head.mlp.0.bias", "depth_head.mlp.2.weight", "depth_head.mlp.2.bias"}


def test_make_depth_head():
  assert isinstance(make_depth_head("dpt", C, feature_mode="sum"), DPTDepthHead)
  head = make_depth_head("mlp", C, feature_mode="concat", dtype=jnp.bfloat16)
  assert isinstance(head, MLPDepthHead) and head.feature_mode == "concat"
  with pytest.raises(ValueError, match="unknown depth head type 'conv'"):
    make_depth_head("conv", C)


def test_bad_inputs():
  head = DPTDepthHead(C, **SMALL)
  with pytest.raises(ValueError, match="4 feature maps"):
    head.init(jax.random.key(0), [jnp.zeros((1, 2, 2, C))] * 3)
  with pytest.raises(ValueError, match="feature_mode"):
    MLPDepthHead(C, "mean").init(jax.random.key(0), [jnp.zeros((1, 2, 2, C))] * 4)


# ----------------------------------------------------------------------------- resize
@pytest.mark.parametrize("src,dst", [((3, 4), (6, 8)), ((5, 3), (17, 11)), ((24, 32), (7, 5)), ((4, 4), (4, 9)),
                                     ((1, 5), (3, 1)), ((6, 6), (6, 6))])
@pytest.mark.parametrize("target", ["cpu", "tpu"])  # gathers; the TPU's matmul form
def test_resize_matches_torch(src, dst, target, monkeypatch):
  monkeypatch.setattr(resize, "compile_target", lambda: target)
  x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode="bilinear",
                       align_corners=True).permute(0, 2, 3, 1).numpy()
  got = jax.jit(lambda a: resize_bilinear_align_corners(a, dst))(jnp.asarray(x))  # a fresh trace per target
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target", ["cpu", "tpu"])
def test_resize_gradient_matches_torch(target, monkeypatch):
  monkeypatch.setattr(resize, "compile_target", lambda: target)
  x = np.random.default_rng(1).normal(size=(1, 5, 7, 2)).astype(np.float32)
  w = np.random.default_rng(2).normal(size=(1, 9, 4, 2)).astype(np.float32)
  g = jax.grad(lambda a: (resize_bilinear_align_corners(a, (9, 4)) * w).sum())(jnp.asarray(x))
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  (F.interpolate(xt, size=(9, 4), mode="bilinear", align_corners=True) * torch.from_numpy(w).permute(0, 3, 1, 2)).sum().backward()
  np.testing.assert_allclose(g, xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("src,dst", [((6, 8), (12, 16)), ((5, 7), (17, 9)), ((9, 6), (4, 5)), ((4, 4), (4, 4))])
def test_conv3x3_of_resized_gradients_equal_autodiff(src, dst):
  """The low-resolution kernel gradient equals autodiff through resize -> conv (up- and downsizing)."""
  from depthvlm_jax.model.cpu_kernels import conv3x3_of_resized, conv_same
  rng = np.random.default_rng(3)
  y = jnp.asarray(rng.normal(size=(2, *src, 5)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(3, 3, 5, 4)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(2, *dst, 4)).astype(np.float32))
  plain = lambda y, k: (conv_same(resize_bilinear_align_corners(y, dst), k) * w).sum()
  fused = lambda y, k: (conv3x3_of_resized(y, k, dst) * w).sum()
  np.testing.assert_allclose(jax.jit(fused)(y, k), jax.jit(plain)(y, k), rtol=1e-6)
  for got, want in zip(jax.jit(jax.grad(fused, (0, 1)))(y, k), jax.jit(jax.grad(plain, (0, 1)))(y, k)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("hw", [(96, 90), (7, 5)])
def test_conv3x3_gradients_equal_autodiff(hw):
  """The flat-offset kernel gradient (large maps) and the autodiff fallback (small maps) both equal
  autodiff of XLA's convolution, input gradient included."""
  from depthvlm_jax.model import cpu_kernels
  assert (hw[0] * hw[1] >= cpu_kernels.FLAT_KERNEL_GRAD_MIN_POSITIONS) == (hw == (96, 90))
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, *hw, 5)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(3, 3, 5, 4)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(2, *hw, 4)).astype(np.float32))
  plain = lambda x, k: (cpu_kernels.conv_same(x, k) * w).sum()
  custom = lambda x, k: (cpu_kernels.conv3x3(x, k) * w).sum()
  np.testing.assert_array_equal(jax.jit(custom)(x, k), jax.jit(plain)(x, k))
  for got, want in zip(jax.jit(jax.grad(custom, (0, 1)))(x, k), jax.jit(jax.grad(plain, (0, 1)))(x, k)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  # The kernel gradient alone, against a direct NumPy sum over taps.
  xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.stack([np.stack([np.einsum("bhwc,bhwo->co", xp[:, a:a + hw[0], b:b + hw[1]], np.asarray(w))
                             for b in range(3)]) for a in range(3)])
  np.testing.assert_allclose(cpu_kernels.kernel_grad_3x3(x, w), want, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_dpt_gradients_match_torch(small_dpt):
  """Parameter gradients of the head (fused upsample + conv backward included) equal torch autograd."""
  ref, params = small_dpt
  feats = random_features(1, 3, 4, seed=5)
  target = np.random.default_rng(6).normal(size=(1, 96, 128)).astype(np.float32)
  head = DPTDepthHead(C, **SMALL)
  grads = jax.grad(lambda p: (head.apply({"params": p}, [jnp.asarray(f) for f in feats]) * target).sum())(params)
  ref.zero_grad()
  out = ref.depth_head([torch.from_numpy(f.reshape(1, 12, C)) for f in feats], 3, 4, None)
  (out * torch.from_numpy(target)).sum().backward()
  want = {k: v.grad.numpy() for k, v in ref.named_parameters()}
  got = flax_to_torch_state_dict(grads)
  assert set(got) == set(want)
  for k in want:
    scale = np.abs(want[k]).max() + 1e-6
    assert np.abs(np.asarray(got[k]) - want[k]).max() / scale < 1e-4, k
