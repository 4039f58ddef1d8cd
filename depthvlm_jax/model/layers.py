"""Building blocks shared by the vision tower and the text decoder.

Every parameter carries logical axis names (`nn.with_logical_partitioning`), so sharding is a
matter of the rules table in the config (see `depthvlm_jax/sharding.py`), never of model code.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.normal(stddev=0.02)


def logical_init(init_fn, names: Sequence[str | None]):
  """An initializer whose parameter is annotated with logical axis `names`."""
  return nn.with_logical_partitioning(init_fn, tuple(names))


def abstract_params(module: nn.Module, *inputs, boxed: bool = False, **kw_inputs):
  """Shape/dtype tree of `module`'s parameters (`jax.eval_shape` of its init: nothing allocated or compiled).

  Inputs are what `module.init` takes after the key, e.g. `**depthvlm_dummy_inputs(config)` for the
  model or the four feature maps for a depth head. boxed=True keeps the `nn.Partitioned` logical
  axis names (for sharding rules); otherwise plain ShapeDtypeStructs.
  """
  params = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, **kw_inputs)["params"])
  return params if boxed else nn.unbox(params)


class Dense(nn.Module):
  """`y = x @ kernel (+ bias)` with logical axes; kernel (in, out) = the transpose of torch Linear."""

  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", logical_init(default_kernel_init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros_init(), (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (as torch does for fp32 weights), with logical axes."""

  eps: float = 1e-6
  axis_name: str = "norm"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", logical_init(nn.initializers.ones_init(), (self.axis_name,)), (d,),
                       self.param_dtype)
    bias = self.param("bias", logical_init(nn.initializers.zeros_init(), (self.axis_name,)), (d,),
                      self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """Qwen3 RMSNorm: normalise in float32, cast back, then scale (HF `Qwen3VLTextRMSNorm`)."""

  eps: float = 1e-6
  axis_name: str = "norm"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("scale", logical_init(nn.initializers.ones_init(), (self.axis_name,)),
                        (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
    return weight.astype(self.dtype) * normed.astype(self.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
  """(..., d) -> (-x[d/2:], x[:d/2]) concatenated, the usual RoPE helper."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x` (..., heads, head_dim) by angles given as cos/sin (..., head_dim), in float32."""
  xf = x.astype(jnp.float32)
  out = xf * cos[..., None, :] + rotate_half(xf) * sin[..., None, :]
  return out.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Scaled dot-product attention with grouped KV heads and a boolean mask.

  The query heads that share a KV head are laid side by side on the query axis, so both products
  are plain batched matmuls over (batch, kv_heads) with row-major operands (no KV repeat, no layout
  change between the products and the softmax). The softmax is normalised after the value
  product, on the (q_len, head_dim) result instead of the (q_len, kv_len) weights. On XLA:CPU this
  takes 0.7x the time of the textbook form for a vision block of the benchmark model and 0.5x for
  an LLM layer's forward + gradient (`benchmarks/attention.py`). A row whose keys are all masked
  averages all values, as a softmax over equal logits does.

  Args:
    q: (batch, q_len, heads, head_dim).
    k, v: (batch, kv_len, kv_heads, head_dim); heads must be a multiple of kv_heads.
    mask: bool, broadcastable to (batch, 1 or heads, q_len, kv_len), True = attend; None = full attention.

  Returns:
    (batch, q_len, heads, head_dim) in v's dtype; logits, softmax and the value product accumulate
    in float32.
  """
  b, lq, h, d = q.shape
  lk, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  qg = q.reshape(b, lq, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * lq, d)
  logits = jnp.einsum("bkqd,bksd->bkqs", qg, k.transpose(0, 2, 1, 3), preferred_element_type=jnp.float32)
  logits = logits.reshape(b, kvh, g, lq, lk) * (d**-0.5)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, mask.shape[1], lq, lk))
    m = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(b, kvh, g, lq, lk)
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  # The shift only guards exp against overflow; the result does not depend on it.
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  total = jnp.sum(weights, axis=-1, keepdims=True)  # >= 1: the maximum contributes exp(0)
  out = jnp.einsum("bkqs,bksd->bkqd", weights.reshape(b, kvh, g * lq, lk).astype(v.dtype), v.transpose(0, 2, 1, 3),
                   preferred_element_type=jnp.float32)
  out = out.reshape(b, kvh, g, lq, d) / total
  return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d).astype(v.dtype)


def checkpoint_policy(name: str):
  """The `jax.checkpoint_policies` entry called `name` (what a rematerialised block may keep)."""
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or not callable(policy) or name.startswith("_"):
    raise ValueError(f"unknown remat policy {name!r}; expected a name from jax.checkpoint_policies, "
                     "e.g. nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable")
  return policy


def run_blocks(parent: nn.Module, names: Sequence[str], make: Callable[[str | None], nn.Module],
               call: Callable[[nn.Module, jax.Array], jax.Array], x: jax.Array, *, scan: bool,
               remat: bool, remat_policy: str, tail: int = 0) -> jax.Array:
  """Applies the identically shaped blocks `names` (children of `parent`) to `x`, in order.

  `make(name)` builds a block: a child of `parent` called `name`, or with None an unbound template
  of the same block. `call(block, x)` applies one block and returns the new `x`.

  Unrolled (`scan=False`, and always while initialising, which creates the parameters): one call per
  child, each a copy in the compiled program. Scanned: the children's parameters are stacked on a new
  leading axis inside the program and one `lax.scan` runs the template over them, so the compiler
  sees a single block whatever the depth. The parameter tree keeps one entry per layer (the
  Hugging Face and checkpoint layout); the stacking costs one extra copy of these blocks' weights per
  step, small against their activations. With `remat`, each block keeps only what
  `remat_policy` allows and recomputes the rest in the backward pass.

  `tail` blocks at the end of a scanned run are called after the loop instead of in it (same
  result). XLA's cost analysis counts a loop body once whatever its trip count; the compile report
  (`depthvlm_jax.aot`) compiles with a tail of 1 to read one iteration's cost as the difference.
  """
  policy = checkpoint_policy(remat_policy) if remat else None
  if not scan or len(names) < 2 or parent.is_initializing():
    for name in names:
      x = call(make(name), x)
    return x
  tail = min(tail, len(names) - 1)
  looped, after = names[:len(names) - tail], names[len(names) - tail:]
  template = make(None)
  params = parent.variables["params"]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[name] for name in looped])

  def body(h, block_params):
    return template.apply({"params": block_params}, h, method=call), None

  if remat:
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  x, _ = jax.lax.scan(body, x, stacked)
  for name in after:
    x = call(make(name), x)
  return x
