"""Checks of a training config, all before any data or model work starts (`ConfigError` lists every problem)."""

from __future__ import annotations

import re

import jax
from etils import epath
from flax.traverse_util import flatten_dict

from depthvlm_jax import sharding
from depthvlm_jax.model.config import ATTENTION_IMPLS, ConfigError
from depthvlm_jax.model import lora
from depthvlm_jax.model.depthvlm import DepthHeadConfig, depthvlm_dummy_inputs
from depthvlm_jax.model.hub import HubError, resolve_model_dir
from depthvlm_jax.model.layers import abstract_params, checkpoint_policy, resolve_attention_impl
from depthvlm_jax.runs.model_from_config import DTYPES, build_model
from depthvlm_jax.train import sizing
from depthvlm_jax.train.data import depth_source_names


def _source_problems(field: str, value: str) -> list[str]:
  """Problems of one `data.train_files`/`eval_files` entry "ann.jsonl|image_root|depth_root[|kind]"."""
  parts = str(value).split("|")
  if len(parts) < 2 or not parts[0]:
    return [f"{field}={value!r}: expected 'ann.jsonl|image_root|depth_root[|kind]'"]
  out = []
  if not epath.Path(parts[0]).is_file():
    out.append(f"{field}: annotation file {parts[0]!r} not found")
  for name, root in zip(("image_root", "depth_root"), parts[1:3]):
    if root and not epath.Path(root).is_dir():
      out.append(f"{field}: {name} {root!r} is not a directory")
  return out


def validate_config(config) -> None:
  """Raises ConfigError listing every problem, before any data or model work starts."""
  errors = []
  buckets = config.data.buckets
  if not buckets:
    errors.append("data.buckets is empty: give at least one (H, W) image bucket")
  for b in buckets:
    if (not isinstance(b, (tuple, list)) or len(b) != 2 or not all(isinstance(x, int) and x > 0 and x % 32 == 0
                                                                  for x in b)):
      errors.append(f"data.buckets entry {b!r}: expected (H, W), both positive multiples of 32")
  if len({tuple(b) for b in buckets if isinstance(b, (tuple, list))}) != len(buckets):
    errors.append(f"data.buckets={tuple(map(tuple, buckets))}: a bucket is listed twice")
  t = config.train
  for name, value in (("train.global_batch", t.global_batch), ("train.micro_batches", t.micro_batches),
                      ("ckpt_every", config.ckpt_every), ("log_every", config.log_every),
                      ("keep_ckpts", config.keep_ckpts), ("train.max_nonfinite_steps", t.max_nonfinite_steps),
                      ("data.seq_len", config.data.seq_len),
                      ("eval_per_device_batch", config.eval_per_device_batch)):
    if value <= 0:
      errors.append(f"{name}={value}: expected a positive integer")
  if t.global_batch > 0 and t.micro_batches > 0 and t.global_batch % t.micro_batches:
    errors.append(f"train.global_batch={t.global_batch} not divisible by train.micro_batches={t.micro_batches}")
  try:
    sizing.parse_rows(t.per_device_rows)
  except sizing.SizingError as e:
    errors.append(str(e))
  if not 0 < t.memory_fraction <= 1:
    errors.append(f"train.memory_fraction={t.memory_fraction}: expected 0 < f <= 1")
  if t.memory_budget_gib < 0:
    errors.append(f"train.memory_budget_gib={t.memory_budget_gib}: expected >= 0 (0 = the device's own memory)")
  if t.total_steps < 0:
    errors.append(f"train.total_steps={t.total_steps}: expected >= 0 (0 = from train.epochs)")
  if t.total_steps == 0 and not t.epochs > 0:
    errors.append(f"train.epochs={t.epochs}: expected > 0 when train.total_steps=0")
  # NaN passes on purpose: every update is then refused by the step's non-finite guard, which stops the
  # run after train.max_nonfinite_steps naming the last good checkpoint (a tested fault path).
  if t.lr <= 0 or t.lr == float("inf"):
    errors.append(f"train.lr={t.lr}: expected a positive learning rate")
  if not 0 <= t.warmup_fraction < 1:
    errors.append(f"train.warmup_fraction={t.warmup_fraction}: expected 0 <= f < 1")
  if config.eval_every < 0:
    errors.append(f"eval_every={config.eval_every}: expected >= 0 (0 = only at the end)")
  if config.stage not in (1, 2):
    errors.append(f"stage={config.stage}: expected 1 or 2")
  if not config.train.trainable:
    errors.append("train.trainable is empty: give (regex, trainable) rules")
  try:
    checkpoint_policy(config.model.remat_policy)
  except ValueError as e:
    errors.append(f"model.remat_policy: {e}")
  if config.model.attention_impl not in ATTENTION_IMPLS:
    errors.append(f"model.attention_impl={config.model.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
  for name in ("compute_dtype", "param_dtype", "frozen_dtype"):
    if config.model[name] not in DTYPES:
      errors.append(f"model.{name}={config.model[name]!r}: expected one of {sorted(DTYPES)}")
  if config.model.size != "tiny" and not config.model.hf_dir and not config.model_init and not config.resume:
    errors.append(f"model.size={config.model.size!r} needs model.hf_dir (a Qwen3-VL-Instruct directory or hub id)")
  if config.model.hf_dir:
    try:
      hf_dir = resolve_model_dir(config.model.hf_dir)  # a hub id -> its snapshot folder
    except HubError as e:
      errors.append(f"model.hf_dir={e}")
    else:
      if not (epath.Path(hf_dir) / "config.json").exists():
        errors.append(f"model.hf_dir={config.model.hf_dir!r}: no config.json there (expected a local Qwen3-VL "
                      "directory or a hub id org/name[@revision])")
  for name in ("model_init", "resume"):
    if config[name] and not (epath.Path(config[name]) / "checkpoints").is_dir():
      errors.append(f"{name}={config[name]!r}: no checkpoints/ there (expected the workdir of an earlier run)")
  if config.data.kind not in ("synthetic", "jsonl"):
    errors.append(f"data.kind={config.data.kind!r}: expected 'synthetic' or 'jsonl'")
  if config.data.kind == "synthetic":
    named = [f"data.{g}" for g in ("train_files", "eval_files", "qa_files") if config.data[g]]
    if named:
      errors.append(f"{', '.join(named)} given but data.kind='synthetic' trains on generated scenes and ignores "
                    "them; set data.kind='jsonl' to train on those files (or remove them)")
  if config.data.kind == "jsonl":
    if not config.data.train_files:
      errors.append("data.kind='jsonl' needs data.train_files")
    for group in ("train_files", "eval_files", "qa_files"):
      for key, value in config.data[group].items():
        errors += _source_problems(f"data.{group}.{key}", value)
  names = depth_source_names(config)
  for key, value in config.data.train_weights.items():
    if key not in names:
      errors.append(f"data.train_weights.{key}: no such train source; expected one of {names}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
      errors.append(f"data.train_weights.{key}={value!r}: expected a positive number (default: the record count)")
  if not 0 <= config.data.qa_weight < 1:
    errors.append(f"data.qa_weight={config.data.qa_weight}: expected 0 <= w < 1")
  if not 0 < config.data.max_skip_rate <= 1:
    errors.append(f"data.max_skip_rate={config.data.max_skip_rate}: expected 0 < rate <= 1 (1 = never stop)")
  if config.data.skip_rate_min_samples < 1:
    errors.append(f"data.skip_rate_min_samples={config.data.skip_rate_min_samples}: expected a positive integer")
  try:
    DepthHeadConfig(config.model.head_type, config.model.mlp_feature_mode)
  except ConfigError as e:
    errors.append(str(e))
  errors += _lora_problems(config, model_known=not errors)
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _lora_problems(config, model_known: bool) -> list[str]:
  """Problems of the `train.lora_*` settings. With a rank > 0 and an otherwise valid config, the
  model's parameter shapes are traced (`jax.eval_shape`, nothing allocated) to check that the
  targets regex selects at least one linear layer, alike in every repeated block when they are
  scanned, each with both dimensions larger than the rank."""
  t = config.train
  rank, alpha, targets = t.lora_rank, t.lora_alpha, t.lora_targets
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    return [f"train.lora_rank={rank!r}: expected an integer >= 0 (0 = full fine-tuning)"]
  if rank == 0:
    return []
  out = []
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
    out.append(f"train.lora_alpha={alpha!r}: expected a positive number (the adapters' scale is alpha / rank)")
  try:
    re.compile(targets)
  except (re.error, TypeError) as e:
    return out + [f"train.lora_targets={targets!r}: not a regular expression ({e})"]
  if not model_known:
    return out
  try:
    model = build_model(config)
    params = abstract_params(model, **depthvlm_dummy_inputs(model.config))
  except Exception as e:  # noqa: BLE001  (what qwix or the model raise for an unusable target)
    return out + [f"train.lora_targets={targets!r}: the model cannot carry these adapters "
                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
  adapted = lora.adapter_modules(params)
  if not adapted:
    linear = lora.linear_modules(params)
    return out + [f"train.lora_targets={targets!r} matches no linear layer's module path (e.g. "
                  f"{', '.join(linear[:2] + linear[-1:])})"]
  uneven = lora.uneven_scanned_adapters(params)
  if uneven and config.model.scan_layers:
    out.append(f"train.lora_targets={targets!r} adapts the repeated blocks unevenly (e.g. {uneven[:3]}); "
               "with model.scan_layers=True every layer needs the same adapters (or set model.scan_layers=False)")
  flat = flatten_dict(params)
  small = [m for m in adapted if min(flat[tuple(m.split("/")) + ("kernel",)].shape) <= rank]
  if small:
    out.append(f"train.lora_rank={rank} is not below both dimensions of {small[0]} "
               f"{tuple(flat[tuple(small[0].split('/')) + ('kernel',)].shape)}: expected a lower rank")
  return out


def make_mesh(config) -> jax.sharding.Mesh:
  """The device mesh of `config.mesh` (ConfigError naming `mesh` when the devices do not fit it, or
  the train batch when its micro-batches do not split over the mesh's batch shards)."""
  try:
    mesh = sharding.make_mesh(dict(config.mesh))
  except ValueError as e:
    raise ConfigError(f"invalid config: mesh={dict(config.mesh)}: {e}") from None
  try:
    sharding.check_batch_divides(mesh, config.train.global_batch, config.train.micro_batches)
  except ValueError as e:
    raise ConfigError(f"invalid config: {e}") from None
  check_attention_impl(config, mesh)
  return mesh


def plan_run(config, devices=None, model=None):
  """(config with the plan's mesh and micro-batches, mesh, `sizing.Plan`) of `config` on `devices`
  (default: all), nothing compiled; ConfigError naming the setting when the batch or the state cannot
  be split over them."""
  devices = list(jax.devices() if devices is None else devices)
  try:
    plan = sizing.plan_for(config, devices, model)
    config = sizing.with_plan(config, plan)
    mesh = sharding.make_mesh(plan.mesh, devices)
  except ValueError as e:
    raise ConfigError(f"invalid config: {e}") from None
  check_attention_impl(config, mesh)
  return config, mesh, plan


def check_attention_impl(config, mesh) -> None:
  """ConfigError unless `model.attention_impl` compiles for the platform of the mesh's devices."""
  try:
    resolve_attention_impl(config.model.attention_impl, mesh.devices.flat[0].platform)
  except ValueError as e:
    raise ConfigError(f"invalid config: model.{e}") from None
