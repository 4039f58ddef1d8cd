"""Building blocks shared by the vision tower and the text decoder.

Every parameter carries logical axis names (`nn.with_logical_partitioning`), so sharding is a
matter of the rules table in the config (see `depthvlm_jax/sharding.py`), never of model code.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from depthvlm_jax import sharding
from depthvlm_jax.sharding import compile_target
from depthvlm_jax.model import cpu_kernels
from depthvlm_jax.model.config import ATTENTION_IMPLS

Dtype = Any
_log = logging.getLogger(__name__)

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


def weight_as(x: jax.Array, weight: jax.Array, dtype) -> jax.Array:
  """`weight` in `dtype`, for a matmul with `x`. In a one-device XLA:CPU program whose weight is
  converted (a cast here, or XLA:CPU's float32 upcast of a bfloat16 matmul), the weight is first
  tied to `x` (`cpu_kernels.weight_after_input`), so the converted copy is made when the layer runs
  rather than at the start of the program."""
  converted = weight.dtype != jnp.dtype(dtype) or weight.dtype in (jnp.bfloat16, jnp.float16)
  if converted and compile_target() == "cpu" and _one_device_program():
    weight = cpu_kernels.weight_after_input(x, weight)
  return weight.astype(dtype)


def _widened(v: jax.Array, dtype) -> jax.Array:
  """`v` rounded to `dtype`, then in float32 (exactly: float32 holds every bfloat16 and float16 value)."""
  return v.astype(dtype).astype(jnp.float32)


# A per-channel parameter broadcast over the positions of a `dtype` activation (a bias, a norm scale)
# gets as gradient the output gradient summed over those positions. Autodiff sums in the dtype of the
# broadcast value: in bfloat16 a sum of many terms stalls once the running total outgrows them (8
# significant bits), e.g. a DPT output conv's bias over a 96x128 map of 8 images lost half of its
# gradient. The two ops below therefore combine in float32 the values rounded to `dtype` (the forward
# result is that of the `dtype` op, rounded once) and the gradient sums in float32.
def add_bias(y: jax.Array, bias: jax.Array, dtype) -> jax.Array:
  """`y + bias` in `dtype`, its bias gradient summed in float32 (see above)."""
  return (_widened(y, dtype) + _widened(bias, dtype)).astype(dtype)


def scale_by(weight: jax.Array, x: jax.Array, dtype) -> jax.Array:
  """`weight * x` in `dtype` (the product of two `dtype` values is exact in float32), its weight
  gradient summed in float32 (see above)."""
  return (_widened(weight, dtype) * _widened(x, dtype)).astype(dtype)


class Dense(nn.Module):
  """`y = x @ kernel (+ bias)` with logical axes; kernel (in, out) = the transpose of torch Linear.

  The product is a plain `jax.lax.dot_general` on the kernel as read from the module's parameters,
  which is the call `qwix` intercepts to add LoRA adapters or quantize the kernel (`model/lora.py`).
  """

  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", logical_init(default_kernel_init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    # qwix's int8 weights (a quantized array it dequantizes in the product) go to the product as read
    w = weight_as(x, kernel, self.dtype) if isinstance(kernel, jax.Array) else kernel
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    y = y.astype(self.dtype)  # a LoRA term in the adapters' dtype (float32) would promote y
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros_init(), (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = add_bias(y, bias, self.dtype)
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
    return scale_by(weight, normed, self.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
  """(..., d) -> (-x[d/2:], x[:d/2]) concatenated, the usual RoPE helper."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x` (..., heads, head_dim) by angles given as cos/sin (..., head_dim), in float32."""
  xf = x.astype(jnp.float32)
  out = xf * cos[..., None, :] + rotate_half(xf) * sin[..., None, :]
  return out.astype(x.dtype)


# ----------------------------------------------------------------------------- attention
# Which attention kernel a trace uses. "auto" picks by the compile target (`compile_target`): the
# Pallas splash kernel on TPU, cuDNN's fused kernel on NVIDIA GPUs, `_attention_xla` elsewhere.
_IMPL_PLATFORM = {"splash": "tpu", "cudnn": "gpu"}


def _one_device_program() -> bool:
  """Whether the current trace compiles for one device (no mesh in context, or a 1-device mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or mesh.size == 1


def resolve_attention_impl(impl: str, platform: str | None = None) -> str:
  """"auto" -> the kernel for `platform` (default: `compile_target()`); an explicit kernel is
  checked against the platform it compiles for (ValueError otherwise)."""
  platform = compile_target() if platform is None else ("gpu" if platform in ("cuda", "rocm") else platform)
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}; expected one of {ATTENTION_IMPLS}")
  if impl == "auto":
    return {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")
  if impl in _IMPL_PLATFORM and _IMPL_PLATFORM[impl] != platform:
    raise ValueError(f"attention_impl={impl!r} compiles for {_IMPL_PLATFORM[impl]} only, "
                     f"the target is {platform}")
  return impl


@flax.struct.dataclass
class AttentionMask:
  """Which keys each query sees, in the structured form the fused kernels take.

  A query attends the keys where `kv_valid` holds and, when `causal`, only keys at slots up to its
  own (query i sits at slot `q_offset + i`). `dense()` is the boolean (B, 1, Lq, Lk) form.

  Attributes:
    kv_valid: (B, Lk) bool, True = real key (False = padding).
    causal: static; the decoder's causal order.
    q_offset: None (queries at slots 0..Lq-1, self-attention) or an int32 scalar (KV cache slot of
      the first query).
    kv_prefix: static; the valid keys of every row form a prefix (right padding), as the vision
      tower's patch slots do. cuDNN then takes sequence lengths instead of a mask.
  """

  kv_valid: jax.Array
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  q_offset: jax.Array | None = None
  kv_prefix: bool = flax.struct.field(pytree_node=False, default=False)

  def dense(self, q_len: int) -> jax.Array:
    """(B, 1, q_len, Lk) bool."""
    valid = self.kv_valid.astype(bool)[:, None, None, :]
    if not self.causal:
      return valid
    start = 0 if self.q_offset is None else self.q_offset
    causal = jnp.arange(valid.shape[-1])[None, :] <= start + jnp.arange(q_len)[:, None]
    return causal[None, None] & valid


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | jax.Array | None,
              impl: str = "auto") -> jax.Array:
  """Scaled dot-product attention with grouped KV heads, by the kernel `impl` picks.

  "xla" is `_attention_xla` (logits materialised, fastest on XLA:CPU); "splash" is the Pallas TPU
  kernel (`splash_attention`), "cudnn" cuDNN's flash attention (`cudnn_attention`); "auto" resolves
  by `compile_target()`. The fused kernels need self-attention with an `AttentionMask` (no KV
  cache offset); other calls, and shapes or dtypes a kernel does not take (see each), use
  `_attention_xla`. Every kernel gives the same output at real query positions (queries whose
  own slot is a valid key); rows of padding queries may differ and are never read by the model.

  Args:
    q: (batch, q_len, heads, head_dim).
    k, v: (batch, kv_len, kv_heads, head_dim); heads must be a multiple of kv_heads.
    mask: an `AttentionMask`, a bool array broadcastable to (batch, 1 or heads, q_len, kv_len)
      (True = attend), or None = full attention.
    impl: one of `ATTENTION_IMPLS`.

  Returns:
    (batch, q_len, heads, head_dim) in v's dtype.
  """
  impl = resolve_attention_impl(impl)
  structured = isinstance(mask, AttentionMask)
  fused_ok = structured and mask.q_offset is None and q.shape[1] == k.shape[1]
  # Without a mesh in context the kernel runs unsharded: right for one device; a kernel call in a
  # multi-device GSPMD program would be replicated, so that takes the XLA form.
  if impl == "splash" and fused_ok and (not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1):
    return splash_attention(q, k, v, mask)
  if impl == "cudnn" and fused_ok and cudnn_supports(q, k):
    try:
      return cudnn_attention(q, k, v, mask)
    except (RuntimeError, NotImplementedError) as e:  # raised while tracing: no cuDNN on this host, ...
      _log.warning("cuDNN attention unavailable for %s x %s %s (%s); using the XLA form", q.shape, k.shape,
                   q.dtype, e)
  dense = mask.dense(q.shape[1]) if structured else mask
  if impl == "xla" and compile_target() == "cpu":  # bounded memory for long sequences on the CPU
    return cpu_kernels.attention_in_query_chunks(_attention_xla, q, k, v, dense, MAX_LOGITS_BYTES)
  return _attention_xla(q, k, v, dense)


# On XLA:CPU, the most float32 attention logits the XLA form holds at once; larger calls run in
# query chunks. The 4B vision tower on a 992x1344 image (5208 patches, 16 heads) would otherwise hold
# 1.7 GB of logits per block, several copies of it at the block's peak.
MAX_LOGITS_BYTES = 256 * 2**20


def _segment_ids(mask: AttentionMask) -> jax.Array:
  """(B, L) int32: 1 for valid slots, 0 for padding. Valid queries see valid keys only; a padding
  query sees padding keys (itself at least), so no row of the kernels' masks is empty."""
  return mask.kv_valid.astype(jnp.int32)


def _splash_block(length: int) -> int:
  return next(b for b in (512, 256, 128) if length % b == 0)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                     interpret: bool = False) -> jax.Array:
  """Self-attention by the Pallas TPU splash kernel (`jax.experimental.pallas.ops.tpu`).

  The static part of the mask (causal or full) is the kernel's block-sparse mask; padding is
  `_segment_ids`. The sequence is padded to a multiple of 128 (as padding slots). With a mesh in
  context (`sharding.in_mesh`) the kernel runs per shard (`jax.shard_map`): the batch over the mesh axes of
  the "batch" rule, heads over those of "q_heads" when both head counts divide; a kernel call in a
  GSPMD program would otherwise be replicated. interpret=True runs the kernel's Python semantics
  (for tests on the CPU).

  Args: as `attention` (q_len == kv_len). Returns: (batch, q_len, heads, head_dim) in v's dtype.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, l, h, d = q.shape
  kvh = k.shape[2]
  seg = _segment_ids(mask)
  padded = -(-l // 128) * 128
  if padded != l:
    pad = ((0, 0), (0, padded - l), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    seg = jnp.pad(seg, ((0, 0), (0, padded - l)))
  q = q * jnp.asarray(d**-0.5, q.dtype)  # the kernel takes no scale

  def per_shard(q, k, v, seg):
    heads = q.shape[2]
    block = _splash_block(padded)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    shape = (padded, padded)
    one = splash.CausalMask(shape) if mask.causal else splash.FullMask(shape)
    kernel = splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
        heads_first(q), heads_first(k), heads_first(v), seg)
    return heads_first(out)

  ctx = jax.sharding.get_abstract_mesh()
  if not ctx.empty:
    # kv_heads is the smaller count: heads split where both counts divide, keeping each group whole
    qkv_spec = sharding.activation_spec(ctx, "batch", None, "q_heads", None, shape=(b, padded, kvh, d))
    seg_spec = PartitionSpec(qkv_spec[0], None)
    per_shard = jax.shard_map(per_shard, mesh=ctx, in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec,
                              check_vma=False)
  return per_shard(q, k, v, seg)[:, :l].astype(v.dtype)


def cudnn_supports(q: jax.Array, k: jax.Array) -> bool:
  """Whether cuDNN's flash attention takes these operands: fp16/bf16, head_dim a multiple of 8 and
  at most 128 (256 from Hopper on, which a compile on a GPU-less host cannot see)."""
  d = q.shape[-1]
  return q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype and d % 8 == 0 and d <= 128


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                    implementation: str = "cudnn") -> jax.Array:
  """Self-attention by `jax.nn.dot_product_attention` (cuDNN's fused kernel by default).

  Causal masks use the kernel's causal mode. Padding: with `kv_prefix` the valid-key counts are
  the query and key sequence lengths (at least 1, so no row is empty); otherwise the boolean
  (B, 1, L, L) mask, which cuDNN adds as a bias. implementation="xla" runs the same call through
  XLA (tests on the CPU).

  Args: as `attention` (q_len == kv_len). Returns: (batch, q_len, heads, head_dim) in v's dtype.
  """
  if mask.kv_prefix:
    lengths = jnp.maximum(mask.kv_valid.astype(jnp.int32).sum(-1), 1)
    kw = dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  else:
    seg = _segment_ids(mask)
    kw = dict(mask=(seg[:, :, None] == seg[:, None, :])[:, None])
  out = jax.nn.dot_product_attention(q, k, v, is_causal=mask.causal, implementation=implementation, **kw)
  return out.astype(v.dtype)


# The name scope of `_attention_xla`: the compile report (`depthvlm_jax.aot`) counts the FLOPs traced
# under it to charge the attention kernels that XLA's TPU cost model does not cost.
ATTENTION_SCOPE = "attention_core"


def _attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Scaled dot-product attention with grouped KV heads and a boolean mask, logits materialised.

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
  with jax.named_scope(ATTENTION_SCOPE):  # its FLOPs are what `aot` charges for kernels the cost model skips
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


def run_blocks(parent: nn.Module, blocks: Sequence[nn.Module], template: nn.Module,
               call: Callable[[nn.Module, jax.Array], jax.Array], x: jax.Array, *, scan: bool,
               remat: bool, remat_policy: str, tail: int = 0) -> jax.Array:
  """Applies the identically shaped `blocks` (named children of `parent`) to `x`, in order.

  `template` is an unbound copy of one block (`parent=None`); `call(block, x)` applies one block and
  returns the new `x`.

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
  if not scan or len(blocks) < 2 or parent.is_initializing():
    for block in blocks:
      x = call(block, x)
    return x
  tail = min(tail, len(blocks) - 1)
  looped, after = blocks[:len(blocks) - tail], blocks[len(blocks) - tail:]
  params = parent.variables["params"]
  trees = [params[block.name] for block in looped]
  first = jax.tree.structure(trees[0])
  for block, tree in zip(looped[1:], trees[1:]):
    if jax.tree.structure(tree) != first:
      raise ValueError(f"scanned blocks {looped[0].name} and {block.name} of {'/'.join(parent.path)} hold "
                       "different parameters (LoRA adapters on some layers only?); adapt the same projections "
                       "in every layer, or set model.scan_layers=False")
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
  # The loop body sees the module path of the first looped block, so code that selects modules by
  # path (qwix's LoRA and quantization rules) treats every iteration as that block.
  path = (*parent.path, looped[0].name)

  def body(h, block_params):
    block = template.clone(parent=flax.core.Scope({"params": block_params}, path=path))
    return call(block, h), None

  if remat:
    body = jax.checkpoint(body, policy=checkpoint_policy(remat_policy), prevent_cse=False)
  x, _ = jax.lax.scan(body, x, stacked)
  for block in after:
    x = call(block, x)
  return x
