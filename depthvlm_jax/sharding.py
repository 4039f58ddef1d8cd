"""Device mesh and logical-axis sharding rules: sharding is data, not model code.

Every parameter is annotated with logical axis names in the model files; one rules table maps those
names (and activation names) onto mesh axes. The same code runs on 1 CPU, 8 simulated devices or a
pod slice: only the mesh shape changes. A dimension that does not divide evenly over its mesh
axes is replicated instead of failing (e.g. a vocabulary of 151936 over 3 devices).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict as flatten, unflatten_dict as unflatten
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Weights: FSDP over the model width, tensor parallel over heads/MLP/vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations (pinned inside the model by `constrain`, inputs by `activation_sharding`)
    ("batch", ("data", "fsdp")),
    ("images", ("data", "fsdp")),
    ("length", None),
    ("image_tokens", None),
    ("patches", None),
    ("act_embed", None),  # residual stream width: whole on every device
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    # text decoder weights
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # vision tower weights
    ("vision_embed", "fsdp"),
    ("vision_qkv", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_merged", "fsdp"),
    ("vision_merged_mlp", "tensor"),
    ("vision_patch", None),
    ("vision_pos", None),
    # depth head weights (small: keep convolutions replicated, shard the wide channel axis)
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("depth_patch", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes data/fsdp/tensor; one size may be -1 (auto-fill)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} unknown; expected a subset of {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(shape)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(shape)}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{len(devices)} available")
  return Mesh(device_grid(sizes, devices), MESH_AXES)


def slice_count(devices: Sequence[Any]) -> int:
  """How many slices (ICI domains joined over the data-centre network) `devices` span."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(sizes: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """`devices` laid out as an array of shape `sizes` (data, fsdp, tensor) along the physical topology.

  One slice: `mesh_utils.create_device_mesh` (neighbouring chips of the ICI torus on the inner
  axes). Several slices: `create_hybrid_device_mesh` with the `data` axis split over the slices
  (DCN) and everything else inside each slice, so only the data-parallel gradient reduction crosses
  the slower network. A topology the helpers cannot map keeps the plain device order.
  """
  slices = slice_count(devices)
  sizes = [int(s) for s in sizes]
  if slices > 1:
    if sizes[0] % slices:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the data axis ({sizes[0]}) must be a multiple of "
                       f"the {slices} slices the devices span (it runs over the data-centre network)")
    ici = [sizes[0] // slices] + sizes[1:]
    return mesh_utils.create_hybrid_device_mesh(ici, [slices] + [1] * (len(sizes) - 1), devices,
                                                allow_split_physical_axes=True)
  try:
    return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(sizes)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh | jax.sharding.AbstractMesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide evenly."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = tuple(a for a in axes_t if mesh.shape[a] > 1)
    while kept and dim % math.prod(mesh.shape[a] for a in kept):
      kept = kept[:-1]
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return PartitionSpec(*out)


def logical_shardings(boxed_abstract: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a tree of (boxed) parameters, from their logical axis names."""
  specs = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.unbox(boxed_abstract)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit_spec(s, x.shape, mesh)), mesh_specs, shapes,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))


def activation_spec(mesh: Mesh | jax.sharding.AbstractMesh, *names: str | None,
                    shape: Sequence[int] | None = None, rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec of an activation given logical names per dim; with `shape`, axes a dim does not
  divide are dropped."""
  spec = nn.logical_to_mesh(PartitionSpec(*names), rules)
  return spec if shape is None else _fit_spec(spec, shape, mesh)


def activation_sharding(mesh: Mesh, *names: str | None, shape: Sequence[int] | None = None,
                        rules=DEFAULT_RULES) -> NamedSharding:
  """NamedSharding for an activation given logical names per dim (e.g. "batch", "length")."""
  return NamedSharding(mesh, activation_spec(mesh, *names, shape=shape, rules=rules))


def in_mesh(fn, mesh: Mesh, platform: str | None = None):
  """`fn` traced with `mesh` as JAX's context mesh (wrap it before `jax.jit`): the model's activation
  constraints (`constrain`) apply on that mesh, model code sees the compile target
  (`compile_target`: a TPU slice compiled from a CPU host is TPU) and the fused attention
  kernels are laid out over the mesh's axes (`layers.splash_attention`).

  platform: the compile target model code sees instead of the platform of the mesh's devices
  ("tpu", "gpu"); the program still runs on those devices. None (every run) = the devices'. Lets
  the CPU test suite run the program an accelerator compiles, with its kernel choices.
  """
  abstract = mesh.abstract_mesh
  if platform is not None:
    abstract = abstract.update(abstract_device=jax.sharding.AbstractDevice(
        device_kind=platform, num_cores=None, platform=platform))

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(abstract):
      return fn(*args, **kwargs)
  return traced


def compile_target() -> str:
  """The platform the current trace compiles for: "cpu", "tpu" or "gpu".

  That of the mesh in context (`in_mesh`: the trainer and the AOT report trace under the mesh of the
  slice they compile for, so a TPU program traced on a CPU host reads "tpu"), otherwise the default
  backend, where a jit without a mesh runs. Model code picks its kernels by it.
  """
  mesh = jax.sharding.get_abstract_mesh()
  platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
  return "gpu" if platform in ("cuda", "rocm") else platform


def constrain(x: jax.Array, *names: str | None, rules=DEFAULT_RULES) -> jax.Array:
  """`x` pinned to the sharding its logical dim names give (as MaxText's logical constraints).

  Model code marks its block boundaries with this, e.g. `constrain(h, "batch", "length", "act_embed")`,
  so that the partitioner keeps activations batch-sharded instead of choosing a layout that gathers
  them. Only active while tracing under a context mesh (`in_mesh`); otherwise (CPU tests, one device)
  it returns `x`. Dims that do not divide their mesh axes stay whole, as for parameters.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names {names} for an array of shape {x.shape}")
  spec = _fit_spec(nn.logical_to_mesh(PartitionSpec(*names), rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def batch_shards(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the logical "batch" axis is split on `mesh`."""
  axes = dict(rules)["batch"]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_divides(mesh: Mesh, global_batch: int, micro_batches: int = 1, rules=DEFAULT_RULES) -> None:
  """Raises ValueError unless every micro-batch splits evenly over the batch axes of `mesh`.

  An uneven batch would otherwise be replicated (the whole batch on every device), silently.
  """
  shards = batch_shards(mesh, rules)
  if global_batch % (shards * micro_batches):
    raise ValueError(f"train.global_batch={global_batch} with train.micro_batches={micro_batches} gives "
                     f"micro-batches of {global_batch / micro_batches:g} rows, which do not split over the "
                     f"{shards} batch shards of mesh {dict(mesh.shape)}: make global_batch a multiple of "
                     f"{shards * micro_batches}")


def place_params(params: Mapping[str, Any], shardings: Mapping[str, Any]) -> dict[str, Any]:
  """Puts every leaf of a nested params dict (host or device arrays) on the sharding at the same path.

  The two trees must have the same paths; raises ValueError naming the first differences.
  """
  values, target = flatten(params), flatten(shardings)
  if set(values) != set(target):
    diff = sorted("/".join(q) for q in set(values) ^ set(target))
    raise ValueError(f"params and shardings differ at {len(diff)} paths, e.g. {diff[:5]}")
  return unflatten({path: jax.device_put(np.asarray(v), target[path]) for path, v in values.items()})
