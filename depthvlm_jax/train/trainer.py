"""`train_and_evaluate(config, workdir)`: one readable trainer for both stages.

Order of work: validate the config (fail before any work) → data → mesh → abstract params with
their shardings and dtypes → params from (own workdir checkpoint | `resume` | `model_init` |
`model.hf_dir` + fresh head | random init), each restored or loaded straight onto its shards →
frozen params written once → jitted, donated train step → loop with logging, periodic δ1
evaluation and asynchronous checkpoints (train state + grain iterator).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax.traverse_util import flatten_dict, unflatten_dict

from data_pipelines import pipeline, synthetic
from data_pipelines.skips import SKIP_REASONS, check_skip_rates, counts_to_dict, skip_report
from depthvlm_jax import sharding
from depthvlm_jax.evaluation.step import jit_delta1
from depthvlm_jax.model.config import ATTENTION_IMPLS, ConfigError, Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, depth_head_init, depthvlm_dummy_inputs
from depthvlm_jax.model.hf_checkpoint import load_qwen3_vl, read_config_dict
from depthvlm_jax.model.layers import abstract_params, checkpoint_policy, resolve_attention_impl
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.processing.tokenizer import load_tokenizer
from depthvlm_jax.train import checkpoints, distributed, optim, qa_eval, workdir_lock
from depthvlm_jax.train.depth_eval import evaluate_depth, make_eval_set
from depthvlm_jax.train.metrics_log import MetricsLog
from depthvlm_jax.train.step import initial_state, make_train_step, max_supervised_tokens

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
log = logging.getLogger(__name__)
# Libraries that log every checkpoint/compile step at INFO.
NOISY_LOGGERS = ("absl", "orbax", "jax", "grain", "tensorboardX", "urllib3", "filelock")


def setup_logging(verbosity: int = 0) -> None:
  """Our INFO lines on; library INFO lines (orbax, absl, jax, grain) only with verbosity >= 1."""
  logging.getLogger().setLevel(logging.INFO)
  for name in NOISY_LOGGERS:
    logging.getLogger(name).setLevel(logging.INFO if verbosity >= 1 else logging.WARNING)


class NonFiniteError(RuntimeError):
  pass


# ----------------------------------------------------------------------------- config checks
def _source_problems(field: str, value: str) -> list[str]:
  """Problems of one `data.train_files`/`eval_files` entry "ann.jsonl|image_root|depth_root[|kind]"."""
  parts = str(value).split("|")
  if len(parts) < 2 or not parts[0]:
    return [f"{field}={value!r}: expected 'ann.jsonl|image_root|depth_root[|kind]'"]
  out = []
  if not pathlib.Path(parts[0]).is_file():
    out.append(f"{field}: annotation file {parts[0]!r} not found")
  for name, root in zip(("image_root", "depth_root"), parts[1:3]):
    if root and not pathlib.Path(root).is_dir():
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
    errors.append(f"model.size={config.model.size!r} needs model.hf_dir (a local Qwen3-VL-Instruct directory)")
  if config.model.hf_dir and not (pathlib.Path(config.model.hf_dir) / "config.json").exists():
    errors.append(f"model.hf_dir={config.model.hf_dir!r}: no config.json there")
  for name in ("model_init", "resume"):
    if config[name] and not (pathlib.Path(config[name]) / "checkpoints").is_dir():
      errors.append(f"{name}={config[name]!r}: no checkpoints/ there (expected the workdir of an earlier run)")
  if config.data.kind not in ("synthetic", "jsonl"):
    errors.append(f"data.kind={config.data.kind!r}: expected 'synthetic' or 'jsonl'")
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
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


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


def check_attention_impl(config, mesh) -> None:
  """ConfigError unless `model.attention_impl` compiles for the platform of the mesh's devices."""
  try:
    resolve_attention_impl(config.model.attention_impl, mesh.devices.flat[0].platform)
  except ValueError as e:
    raise ConfigError(f"invalid config: model.{e}") from None


# ----------------------------------------------------------------------------- the workdir's config.json
# Settings a resumed run may not change: they define the parameter and optimizer-state trees (or
# the stage's meaning), so the checkpoints of the workdir would not fit them.
FIXED_ON_RESUME = ("stage", "model.", "train.trainable")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """(dotted key, old value, new value) for every setting that differs (JSON forms compared)."""
  a, b = _flat(old), _flat(new)
  missing = object()
  return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)]


def _show(v: Any) -> str:
  return "(absent)" if not isinstance(v, (str, int, float, list, dict, bool, type(None))) else json.dumps(v)


def read_workdir_config(workdir: pathlib.Path) -> dict[str, Any] | None:
  """The recorded config of the run in `workdir` (None if absent); ConfigError naming the file if invalid."""
  path = workdir / "config.json"
  if not path.exists():
    return None
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not valid JSON ({e}); it records this workdir's run: restore it, or delete it "
                      "to record the current config") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: expected a JSON object (the run's config), got {type(data).__name__}")
  return data


def check_resume_config(previous: dict[str, Any] | None, config, workdir: pathlib.Path) -> list[str]:
  """Refuses (ConfigError with the diff) a config whose fixed settings differ from the workdir's run.

  Returns "key: old -> new" lines of the other, allowed changes (schedule, steps, logging, ...).
  """
  if previous is None:
    return []
  # runs recorded before `model.frozen_dtype` existed kept their frozen parameters in float32
  previous = dict(previous, model={"frozen_dtype": "float32", **previous.get("model", {})})
  diff = config_diff(previous, json.loads(config.to_json_best_effort()))
  lines = [f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in diff]
  fixed = [line for (k, _, _), line in zip(diff, lines) if k == "stage" or k.startswith(FIXED_ON_RESUME)]
  if fixed:
    raise ConfigError(f"{workdir / 'config.json'}: the checkpoints in this workdir were trained with another "
                      f"config; changed: {'; '.join(fixed)}. Use a new --workdir (with --config.model_init="
                      f"{workdir} to start from this run's parameters) or the settings recorded there")
  return lines


def _json_safe(obj: Any, path: str, flagged: list[str]) -> Any:
  if isinstance(obj, float) and not math.isfinite(obj):
    flagged.append(path)
    return None
  if isinstance(obj, dict):
    return {k: _json_safe(v, f"{path}.{k}" if path else str(k), flagged) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v, f"{path}[{i}]", flagged) for i, v in enumerate(obj)]
  return obj


def write_results(path: pathlib.Path, results: dict[str, Any]) -> None:
  """results.json as strict JSON: a non-finite number becomes null and its key is listed in `nonfinite`."""
  flagged: list[str] = []
  safe = _json_safe(results, "", flagged)
  if flagged:
    safe["nonfinite"] = flagged
    log.warning("results.json: non-finite values written as null: %s", ", ".join(flagged))
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(safe, indent=2, allow_nan=False))
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- model
def build_model(config) -> DepthVLM:
  if config.model.hf_dir:
    d = read_config_dict(config.model.hf_dir)
    backbone = Qwen3VLConfig.from_hf_dict(d)
  else:
    backbone = {"tiny": Qwen3VLConfig.tiny, "4b": Qwen3VLConfig.qwen3_vl_4b,
                "8b": Qwen3VLConfig.qwen3_vl_8b}[config.model.size]()
  head = DepthHeadConfig(config.model.head_type, config.model.mlp_feature_mode,
                         features=config.model.dpt_features, out_channels=tuple(config.model.dpt_out_channels),
                         head_features=config.model.dpt_head_features)
  backbone = backbone.with_attention_impl(config.model.attention_impl)  # "auto": by the mesh's platform
  return DepthVLM(backbone, head=head, dtype=DTYPES[config.model.compute_dtype],
                  param_dtype=DTYPES[config.model.param_dtype], remat=config.model.remat,
                  remat_policy=config.model.remat_policy, scan_layers=config.model.scan_layers)


def params_like(config, model: DepthVLM, mesh) -> tuple[dict[str, Any], dict[tuple[str, ...], bool]]:
  """(abstract params, trainable mask): every parameter as a ShapeDtypeStruct carrying the sharding
  of the logical rules on `mesh` and the dtype the run keeps it in (`model.param_dtype`, or
  `model.frozen_dtype` for the parameters `train.trainable` freezes). Nothing is allocated."""
  boxed = abstract_params(model, **depthvlm_dummy_inputs(model.config), boxed=True)
  shapes = nn.unbox(boxed)
  mask = optim.trainable_mask(shapes, list(map(tuple, config.train.trainable)))
  frozen_dtype = DTYPES[config.model.frozen_dtype]
  flat_sh = flatten_dict(sharding.logical_shardings(boxed, mesh))
  like = {path: jax.ShapeDtypeStruct(x.shape, x.dtype if mask[path] else frozen_dtype, sharding=flat_sh[path])
          for path, x in flatten_dict(shapes).items()}
  return unflatten_dict(like), mask


def _cast_like(params, like):
  return jax.tree.map(lambda x, t: x.astype(t.dtype), params, like)


def initial_params(config, model: DepthVLM, like, rng):
  """The parameters a new run starts from, each created or read straight onto the sharding and in
  the dtype of its entry in `like` (see `params_like`):

  * `model_init` (previous stage): that run's newest checkpoint, restored with `like` as target;
    nothing random is built.
  * `model.hf_dir`: the Qwen3-VL backbone streamed from the safetensors files and a fresh depth head
    (only the head is initialised).
  * otherwise (tiny): the whole model at random.
  """
  shardings = jax.tree.map(lambda x: x.sharding, like)
  if config.model_init:
    try:
      trainable, frozen = checkpoints.restore_params(config.model_init, like)
    except checkpoints.ParamTreeMismatchError as e:
      raise ConfigError(f"model_init={config.model_init!r}: parameter tree does not match this model ({e})") from None
    return optim.merge_params(trainable, frozen)
  if config.model.hf_dir:  # pretrained backbone, fresh depth head
    head = jax.jit(lambda r: _cast_like(depth_head_init(model, r), {"depth_head": like["depth_head"]}),
                   out_shardings={"depth_head": shardings["depth_head"]})(rng)
    backbone_like = {k: v for k, v in like.items() if k != "depth_head"}
    _, backbone = load_qwen3_vl(config.model.hf_dir, DTYPES[config.model.param_dtype],
                                jax.tree.map(lambda x: x.sharding, backbone_like), other_prefixes=("depth_head.",),
                                dtypes=jax.tree.map(lambda x: x.dtype, backbone_like))
    return dict(backbone, **head)
  init = jax.jit(lambda r: _cast_like(nn.unbox(model.init(r, **depthvlm_dummy_inputs(model.config))["params"]), like),
                 out_shardings=shardings)
  return init(rng)


def abstract_state(optimizer, trainable_like, mesh) -> dict[str, Any]:
  """The train state as ShapeDtypeStructs with the shardings the run keeps it in: params and
  optimizer moments sharded like the trainable parameters, step and counters replicated."""
  replicated = sharding.activation_sharding(mesh)
  opt_like = checkpoints.optimizer_state_like(optimizer, trainable_like, mesh)
  state = jax.eval_shape(initial_state, trainable_like, opt_like)
  return {k: v if k in ("params", "opt_state") else jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
          for k, v in dict(state, params=trainable_like, opt_state=opt_like).items()}


def restore_or_initialise(config, model: DepthVLM, mesh, workdir: pathlib.Path, optimizer, data_iter):
  """(start step or None, train state, frozen params, checkpoint manager) of a run in `workdir`.

  Its own newest intact checkpoint (damaged newer steps set aside), else `resume` (another run's
  checkpoint, iterator included), else `initial_params`. Restores read every array onto its
  target shards; a new run (not one continuing its own checkpoints) writes its frozen parameters
  once, to `<workdir>/frozen_params`, before its first step.
  """
  like, mask = params_like(config, model, mesh)
  trainable_like, frozen_like = optim.split_params(like, mask)
  state_like = abstract_state(optimizer, trainable_like, mesh)
  mgr = checkpoints.manager(workdir / "checkpoints", config.keep_ckpts)
  start = mgr.latest_step()
  if start is not None:
    start, state, frozen, damaged = checkpoints.restore_latest(mgr, state_like, frozen_like, data_iter)
    if damaged and distributed.is_main():
      moved = checkpoints.set_aside(mgr, damaged, workdir / "checkpoints_damaged")
      log.warning("damaged checkpoint step(s) %s moved to %s; resuming from step %d", damaged,
                  ", ".join(map(str, moved)), start)
    distributed.barrier("checkpoint_fallback")
    if damaged and not distributed.is_main():
      mgr.reload()
    if not checkpoints.frozen_path(mgr.directory).is_dir():  # steps of an earlier version, frozen params in each
      checkpoints.save_frozen(workdir, frozen)
    return start, state, frozen, mgr
  if config.resume:
    rmgr = checkpoints.manager(pathlib.Path(config.resume) / "checkpoints", config.keep_ckpts)
    _, state, frozen, _ = checkpoints.restore_latest(rmgr, state_like, frozen_like, data_iter)
  else:
    trainable, frozen = optim.split_params(initial_params(config, model, like, jax.random.key(config.train.seed)), mask)
    opt_state = jax.jit(optimizer.init, out_shardings=jax.tree.map(lambda x: x.sharding, state_like["opt_state"]))(
        trainable)
    state = initial_state(trainable, opt_state)
    state = {k: v if k in ("params", "opt_state") else jax.device_put(v, state_like[k].sharding)
             for k, v in state.items()}
  checkpoints.save_frozen(workdir, frozen)
  return None, state, frozen, mgr


def example_specs(config, model_config: Qwen3VLConfig, with_answer: bool | None = None) -> list[pipeline.ExampleSpec]:
  """The training buckets: each (H, W) of `data.buckets` with `data.seq_len` (0 = the bucket's image
  tokens + `data.text_tokens`). `with_answer` defaults to stage 2."""
  px = model_config.vision.image_token_pixels
  with_answer = config.stage == 2 if with_answer is None else with_answer
  return [pipeline.ExampleSpec((h, w), config.data.seq_len or (h // px) * (w // px) + config.data.text_tokens,
                               with_answer=with_answer) for h, w in config.data.buckets]


def jit_train_step(config, model: DepthVLM, optimizer, mesh, state_shardings, depth_grid: tuple[int, int]):
  """The jitted, donated train step the trainer runs (and `depthvlm_jax.aot` compiles for a slice).

  Fixed state shardings in and out: step 2 reuses step 1's program instead of compiling again. The
  compile target is the platform of the mesh's devices (a TPU slice compiled from a CPU host is TPU).
  """
  step_fn = make_train_step(model, optimizer, depth_grid, config.train.micro_batches,
                            config.train.depth_loss_weight, with_lm=config.stage == 2,
                            lm_positions=config.train.lm_positions, platform=mesh.devices.flat[0].platform)
  # keep_unused: frozen weights a stage does not read (the LM head in stage 1) stay arguments, as they
  # stay resident in HBM, so the compiled argument bytes are what the devices hold.
  # Traced under the mesh: the model's activation constraints keep every row on its batch shard, the
  # model sees its platform (`sharding.compile_target`) and lays the fused attention kernels out over its axes.
  return jax.jit(sharding.in_mesh(step_fn, mesh), donate_argnums=(0,), keep_unused=True,
                 out_shardings=(state_shardings, sharding.activation_sharding(mesh)))


# ----------------------------------------------------------------------------- data
def synthetic_root(config, workdir: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(config.data.synthetic_dir or workdir / "synthetic_data")


def depth_source_names(config) -> list[str]:
  """Names of the RGB-D train sources: the `data.train_files` keys ("synthetic" for synthetic data)."""
  return ["synthetic"] if config.data.kind == "synthetic" else list(config.data.train_files)


def data_sources(config, workdir: pathlib.Path):
  """(train sources, weights, eval sources) from the config; writes the synthetic set if needed.

  Weights: `data.train_weights[name]`, by default the source's record count; the caption/QA
  sources together get `data.qa_weight` of all samples, split by their record counts.
  """
  if config.data.kind == "synthetic":
    root = synthetic_root(config, workdir)
    def ensure():
      return synthetic.ensure_synthetic_dataset(root, config.data.synthetic_train, config.data.synthetic_test,
                                                config.data.synthetic_seed)
    if distributed.is_main():  # one writer; the other processes find the complete set after the barrier
      ensure()
    distributed.barrier("synthetic_data")
    paths = ensure()
    train = [pipeline.SourceSpec(str(paths["train"]), str(root), str(root), "synthetic", name="synthetic")]
    evals = {"synthetic_test": pipeline.SourceSpec(str(paths["test"]), str(root), str(root), "synthetic")}
    qa = [pipeline.SourceSpec(str(paths["qa"]), str(root), "", "synthetic", with_depth=False, name="synthetic_qa")]
  else:
    def spec(name, value, with_depth=True):
      jsonl, image_root, depth_root, *rest = str(value).split("|") + ["", ""]
      return pipeline.SourceSpec(jsonl, image_root, depth_root, rest[0] or "unknown", with_depth, name=name)

    train = [spec(k, v) for k, v in config.data.train_files.items()]
    evals = {k: spec(k, v) for k, v in config.data.eval_files.items()}
    qa = [spec(k, v, with_depth=False) for k, v in config.data.qa_files.items()]
  given = dict(config.data.train_weights)
  weights = [float(given[s.name]) if s.name in given else float(pipeline.count_records(s)) for s in train]
  if config.data.qa_weight > 0 and qa:
    counts = [pipeline.count_records(s) for s in qa]
    share = sum(weights) * config.data.qa_weight / (1 - config.data.qa_weight)
    train = train + qa
    weights = weights + [share * c / sum(counts) for c in counts]
  return train, weights, evals


# ----------------------------------------------------------------------------- main loop
def batch_names(key: str) -> tuple[str | None, ...]:
  """Logical names of a global train-batch array's leading dims (position_ids is (3, B, L))."""
  return (None, "batch") if key == "position_ids" else ("batch",)


def _to_global(batch: dict[str, np.ndarray], mesh, shard: distributed.DataShard) -> dict[str, jax.Array]:
  """This process's rows (local_batch, ...) -> global arrays (global_batch, ...) sharded over the mesh."""
  out = {}
  for k, v in batch.items():
    if k in ("skip_counts", "drawn_counts"):
      continue
    names = batch_names(k)
    if k == "position_ids":
      v = np.moveaxis(v, 0, 1)  # (B, 3, L) -> (3, B, L)
    out[k] = distributed.global_array(v, mesh, names, len(names) - 1, shard)
  return out


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains and evaluates `config` in `workdir` (resuming its own checkpoints); returns the results.

  Every config check (values, input files, the mesh against the devices) runs before anything is
  written. The workdir is locked for the run; its `config.json` is rewritten only once the
  parameters are restored or initialised, and a config whose model, stage or freeze rules differ
  from the run recorded there is refused with the differences.
  """
  validate_config(config)
  mesh = make_mesh(config)
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir={workdir}: exists and is not a directory")
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir, enabled=distributed.is_main()):
    return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config, workdir: pathlib.Path, mesh) -> dict[str, Any]:
  has_checkpoint = (workdir / "checkpoints").is_dir() and any(
      p.name.isdigit() for p in (workdir / "checkpoints").iterdir())
  changes = check_resume_config(read_workdir_config(workdir), config, workdir) if has_checkpoint else []
  model = build_model(config)
  tokenizer = load_tokenizer(config.model.hf_dir or None)
  processor = ImageProcessorConfig.from_hf_dir(config.model.hf_dir) if config.model.hf_dir else ImageProcessorConfig()
  specs = example_specs(config, model.config)
  px = model.config.vision.image_token_pixels
  train_sources, weights, eval_sources = data_sources(config, workdir)
  ds = pipeline.make_dataset(train_sources, weights, specs, model.config, tokenizer, processor,
                             seed=config.data.shuffle_seed)
  # One epoch = every record of every source once (in expectation, with the default weights).
  num_train = sum(ds.records)
  total_steps = config.train.total_steps or max(1, math.ceil(config.train.epochs * num_train / config.train.global_batch))
  log.info("data: %d records in %d sources (%s); buckets: %s", num_train, len(ds.sources),
           ", ".join(f"{n} {c}" for n, c in zip(ds.sources, ds.records)),
           ", ".join(f"{k} {v:.1%}" for k, v in ds.fractions().items()))
  shard = distributed.data_shard(mesh, config.train.global_batch)  # this process's rows of each batch
  data_iter = iter(pipeline.batched(ds.map_datasets(shard.select), shard.local_batch, config.data.num_workers))

  schedule = optim.learning_rate_schedule(config.train.lr, total_steps, config.train.warmup_fraction)
  optimizer = optim.make_optimizer(schedule, config.train.grad_clip, config.train.weight_decay)
  start, state, frozen, mgr = restore_or_initialise(config, model, mesh, workdir, optimizer, data_iter)
  if start is not None:
    log.info("resumed from %s step %d", workdir, start)
    if changes:
      log.info("resuming with changed settings: %s", "; ".join(changes))
  if distributed.is_main():  # the run's record changes only now that its parameters are in place
    tmp = workdir / "config.json.tmp"
    tmp.write_text(config.to_json_best_effort(indent=2))
    os.replace(tmp, workdir / "config.json")

  state_sh = jax.tree.map(lambda x: x.sharding, state)
  train_steps: dict[tuple[int, int], Any] = {}  # one jitted (and compiled) step per bucket (H, W)
  # Held-out δ1: streamed sets, one step built for the run (compiled once per bucket) at the params'
  # shardings. Every held-out record is resized (aspect kept) into the first bucket.
  eval_specs = example_specs(config, model.config, with_answer=False)
  param_sh = jax.tree.map(lambda x: x.sharding, optim.merge_params(state["params"], frozen))
  eval_sets = [make_eval_set(name, src, eval_specs[0], model.config, tokenizer, processor, mesh,
                             config.eval_per_device_batch) for name, src in eval_sources.items()]
  eval_step = jit_delta1(model, mesh, param_sh)
  skip_totals = np.zeros((len(ds.sources), len(SKIP_REASONS)), np.int64)
  drawn_totals = np.zeros(len(ds.sources), np.int64)
  first = int(state["step"])
  metrics = MetricsLog(workdir, start, enabled=distributed.is_main())
  results: dict[str, Any] = {}
  bar = tqdm.tqdm(range(first, total_steps), initial=first, total=total_steps, desc=f"stage {config.stage}",
                  dynamic_ncols=True, disable=not distributed.is_main(), unit="step")
  t0 = time.time()
  # The host reads a step's non-finite counter one step late (after the next step is dispatched, so
  # loading and transferring the next batch overlap the running step), or at once on the steps
  # where it waits for the device anyway (logging, evaluation, checkpoint, last step). Either way
  # the run stops at the step that reached train.max_nonfinite_steps, before its host work.
  unchecked = None  # (step, its non-finite counter) not read yet

  def stop_if_nonfinite(done: int, nonfinite: jax.Array) -> None:
    count = int(nonfinite)
    if count >= config.train.max_nonfinite_steps:
      mgr.wait_until_finished()
      metrics.close()
      raise NonFiniteError(f"{count} consecutive non-finite steps (loss, gradient or update) at step {done} "
                           f"(train.max_nonfinite_steps={config.train.max_nonfinite_steps}); stopping. Last good "
                           f"checkpoint: step {mgr.latest_step()} in {workdir / 'checkpoints'}")

  for step in bar:
    batch = next(data_iter)
    skip_totals += batch["skip_counts"].sum(0)
    drawn_totals += batch["drawn_counts"].sum(0)
    if config.stage == 2 and config.train.lm_positions:
      check_label_budget(batch["labels"], config.train.lm_positions, step + 1)
    bucket = batch["depth"].shape[1:]
    if bucket not in train_steps:
      train_steps[bucket] = jit_train_step(config, model, optimizer, mesh, state_sh, (bucket[0] // px, bucket[1] // px))
    state, m = train_steps[bucket](state, frozen, _to_global(batch, mesh, shard))
    done = step + 1
    if unchecked is not None:
      stop_if_nonfinite(*unchecked)
    unchecked = (done, m.pop("nonfinite"))
    eval_now = (config.eval_every and done % config.eval_every == 0) or done == total_steps
    ckpt_now = done % config.ckpt_every == 0 or done == total_steps
    if done % config.log_every == 0 or eval_now or ckpt_now:
      stop_if_nonfinite(*unchecked)
      unchecked = None
    if done % config.log_every == 0 or done == total_steps:
      skips, drawn = distributed.process_sum(skip_totals), distributed.process_sum(drawn_totals)
      row = {k: float(v) for k, v in m.items()}
      row.update(lr=float(schedule(done - 1)), skipped_samples=counts_to_dict(skips),
                 skipped_by_source=skip_report(skips, drawn, ds.sources), bucket="x".join(map(str, bucket)),
                 skipped_updates=int(state["skipped_updates"]),
                 steps_per_s=(done - first) / max(time.time() - t0, 1e-9))
      bar.set_postfix(loss=f"{row['loss']:.4f}", depth=f"{row['depth_loss']:.4f}", lm=f"{row['lm_loss']:.3f}",
                      lr=f"{row['lr']:.2e}", gnorm=f"{row['grad_norm']:.3f}", skipped=row["skipped_updates"])
      metrics.write(done, row)
      try:
        check_skip_rates(skips, drawn, ds.sources, config.data.max_skip_rate, config.data.skip_rate_min_samples)
      except Exception:
        mgr.wait_until_finished()
        metrics.close()
        raise
    if eval_now:
      full = optim.merge_params(state["params"], frozen)
      for eval_set in eval_sets:
        name = eval_set.name
        results[name] = evaluate_depth(eval_step, full, eval_set, mesh)
        bar.write(f"step {done} eval {name}: delta1 {results[name]['delta1']:.4f} (best constant "
                  f"{results[name]['best_constant_delta1']:.4f} at {results[name]['best_constant_m']:.2f} m)")
        metrics.write(done, results[name], prefix=f"eval/{name}")
    # Only good states are checkpointed: during a streak of refused updates the last good checkpoint stays the latest.
    if ckpt_now and int(state["nonfinite"]) == 0:
      checkpoints.save(mgr, done, state, None, data_iter)  # frozen params: written once, at the start
  bar.close()
  mgr.wait_until_finished()
  if config.eval_qa and config.data.kind == "synthetic":
    root = synthetic_root(config, workdir)
    full = optim.merge_params(state["params"], frozen)
    results["distance_qa"] = qa_eval.evaluate_distance_qa(
        model, full, pipeline.SourceSpec(str(root / "qa_test.jsonl"), str(root), "", "synthetic", with_depth=False),
        eval_specs, tokenizer, processor, str(root / "qa.jsonl"), config.eval_qa,
        config.train.global_batch, config.eval_qa_new_tokens)
    qa = results["distance_qa"]
    log.info("distance QA on %d held-out questions: parse rate %.3f, MAE %s m (without the image: median "
             "distance %.3f m, median of the object's class %.3f m)", qa["n"], qa["parse_rate"], qa["mae_m"],
             qa["constant_mae_m"], qa["class_prior_mae_m"])
    metrics.write(total_steps, {k: v for k, v in qa.items() if k != "examples" and v is not None},
                  prefix="eval/distance_qa")
  metrics.close()
  results["skipped_samples"] = counts_to_dict(distributed.process_sum(skip_totals))
  results["skipped_by_source"] = skip_report(distributed.process_sum(skip_totals),
                                             distributed.process_sum(drawn_totals), ds.sources)
  results["skipped_updates"] = int(state["skipped_updates"])
  if distributed.is_main():
    write_results(workdir / "results.json", results)
  return results


def check_label_budget(labels: np.ndarray, lm_positions: int, step: int) -> None:
  """Refuses a batch whose reply is longer than the LM head's position budget (would be truncated)."""
  longest = max_supervised_tokens(labels)
  if longest > lm_positions:
    raise ConfigError(f"step {step}: a sample supervises {longest} reply tokens but train.lm_positions="
                     f"{lm_positions}; raise train.lm_positions (or set 0 for the LM head on every position)")
