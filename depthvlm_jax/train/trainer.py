"""`train_and_evaluate(config, workdir)`: one readable trainer for both stages.

Order of work: validate the config (fail before any work) → data → mesh → abstract params and
their shardings → params from (own workdir checkpoint | `resume` | `model_init` | `model.hf_dir` |
random init) → jitted, donated train step → loop with logging, periodic δ1 evaluation and
asynchronous checkpoints (train state + frozen params + grain iterator).
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

from data_pipelines import pipeline, synthetic
from data_pipelines.skips import SKIP_REASONS, counts_to_dict
from depthvlm_jax import sharding
from depthvlm_jax.evaluation.metrics import best_constant_delta1, delta1_per_image
from depthvlm_jax.model.config import ATTENTION_IMPLS, ConfigError, Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, depthvlm_dummy_inputs
from depthvlm_jax.model.hf_checkpoint import load_qwen3_vl, read_config_dict
from depthvlm_jax.model.layers import abstract_params, resolve_attention_impl
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.processing.tokenizer import load_tokenizer
from depthvlm_jax.train import checkpoints, distributed, optim, qa_eval, workdir_lock
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
  h, w = config.data.image_size
  if h % 32 or w % 32 or h <= 0 or w <= 0:
    errors.append(f"data.image_size={tuple(config.data.image_size)}: both sides must be positive multiples of 32")
  t = config.train
  for name, value in (("train.global_batch", t.global_batch), ("train.micro_batches", t.micro_batches),
                      ("ckpt_every", config.ckpt_every), ("log_every", config.log_every),
                      ("keep_ckpts", config.keep_ckpts), ("train.max_nonfinite_steps", t.max_nonfinite_steps),
                      ("data.seq_len", config.data.seq_len)):
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
  if config.model.attention_impl not in ATTENTION_IMPLS:
    errors.append(f"model.attention_impl={config.model.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
  for name in ("compute_dtype", "param_dtype"):
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
    for group in ("train_files", "eval_files"):
      for key, value in config.data[group].items():
        errors += _source_problems(f"data.{group}.{key}", value)
  if not 0 <= config.data.qa_weight < 1:
    errors.append(f"data.qa_weight={config.data.qa_weight}: expected 0 <= w < 1")
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
                  param_dtype=DTYPES[config.model.param_dtype], remat=config.model.remat)


def initial_params(config, model: DepthVLM, shardings, rng):
  """Params from `model_init` (previous stage) or HF backbone + fresh head, or random (tiny)."""
  init = jax.jit(lambda r: nn.unbox(model.init(r, **depthvlm_dummy_inputs(model.config))["params"]),
                 out_shardings=shardings)
  if config.model_init:
    trainable, frozen = checkpoints.restore_params(config.model_init)
    try:
      return sharding.place_params(optim.merge_params(trainable, frozen), shardings)
    except ValueError as e:
      raise ConfigError(f"model_init={config.model_init!r}: parameter tree does not match this model ({e})") from None
  params = init(rng)
  if config.model.hf_dir:  # pretrained backbone, fresh depth head
    head = params.pop("depth_head")
    _, backbone = load_qwen3_vl(config.model.hf_dir, DTYPES[config.model.param_dtype],
                                {k: v for k, v in shardings.items() if k != "depth_head"},
                                other_prefixes=("depth_head.",))
    params = dict(backbone, depth_head=head)
  return params


def example_spec(config, model_config: Qwen3VLConfig) -> pipeline.ExampleSpec:
  """The training bucket: `data.image_size` and `data.seq_len` (0 = image tokens + `data.text_tokens`)."""
  h, w = config.data.image_size
  px = model_config.vision.image_token_pixels
  seq_len = config.data.seq_len or (h // px) * (w // px) + config.data.text_tokens
  return pipeline.ExampleSpec((h, w), seq_len, with_answer=config.stage == 2)


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
  # Traced under the mesh: the model sees its platform (`layers.compile_target`) and lays the fused
  # attention kernels out over its axes.
  return jax.jit(sharding.in_mesh(step_fn, mesh), donate_argnums=(0,), keep_unused=True,
                 out_shardings=(state_shardings, sharding.activation_sharding(mesh)))


# ----------------------------------------------------------------------------- data
def synthetic_root(config, workdir: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(config.data.synthetic_dir or workdir / "synthetic_data")


def data_sources(config, workdir: pathlib.Path):
  """(train sources, weights, eval sources) from the config; writes the synthetic set if needed."""
  if config.data.kind == "synthetic":
    root = synthetic_root(config, workdir)
    def ensure():
      return synthetic.ensure_synthetic_dataset(root, config.data.synthetic_train, config.data.synthetic_test,
                                                config.data.synthetic_seed)
    if distributed.is_main():  # one writer; the other processes find the complete set after the barrier
      ensure()
    distributed.barrier("synthetic_data")
    paths = ensure()
    train = [pipeline.SourceSpec(str(paths["train"]), str(root), str(root), "synthetic")]
    evals = {"synthetic_test": pipeline.SourceSpec(str(paths["test"]), str(root), str(root), "synthetic")}
    qa = pipeline.SourceSpec(str(paths["qa"]), str(root), "", "synthetic", with_depth=False)
  else:
    def spec(value, with_depth=True):
      jsonl, image_root, depth_root, *rest = str(value).split("|") + ["", ""]
      return pipeline.SourceSpec(jsonl, image_root, depth_root, rest[0] or "unknown", with_depth)

    train = [spec(v) for v in config.data.train_files.values()]
    evals = {k: spec(v) for k, v in config.data.eval_files.items()}
    qa = None
  weights = [1.0] * len(train)
  if config.data.qa_weight > 0 and qa is not None:
    total = sum(weights)
    train = train + [qa]
    weights = weights + [total * config.data.qa_weight / (1 - config.data.qa_weight)]
  return train, weights, evals


# ----------------------------------------------------------------------------- evaluation
def evaluate_depth(model, params, examples: list[dict[str, np.ndarray]], depth_grid, batch_size: int,
                   mesh=None):
  """Mean per-image δ1 of the model on prepared examples, and the best constant's δ1 (traced under
  `mesh` when given, as the train step is)."""
  fn = lambda p, b: model.apply({"params": p}, b["input_ids"], b["position_ids"], b["attention_mask"],
                                b["pixel_values"], b["image_grid_hw"], compute_logits=False,
                                depth_grid=depth_grid).depth
  fwd = jax.jit(fn if mesh is None else sharding.in_mesh(fn, mesh))
  scores = []
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # pad: one program for every batch
    b = {k: np.stack([e[k] for e in chunk]) for k in ("input_ids", "attention_mask", "pixel_values",
                                                      "image_grid_hw", "depth")}
    b["position_ids"] = np.stack([e["position_ids"] for e in chunk], 1)
    pred = fwd(params, b)
    d1, count = delta1_per_image(pred, jnp.asarray(b["depth"]))
    n_real = min(batch_size, len(examples) - i)
    scores += [float(x) for x, c in zip(np.asarray(d1)[:n_real], np.asarray(count)[:n_real]) if c > 0]
  constant, constant_d1 = best_constant_delta1([e["depth"] for e in examples])
  return {"delta1": float(np.mean(scores)), "images": len(scores), "best_constant_m": constant,
          "best_constant_delta1": constant_d1}


def prepared_eval_examples(source, spec, model_config, tokenizer, processor) -> list[dict[str, np.ndarray]]:
  prepare = pipeline.PrepareExample(source, spec, model_config, tokenizer, processor)
  records, _ = pipeline.load_records(source)
  out = [prepare(r) for r in records]
  return [e for e in out if isinstance(e, dict)]


# ----------------------------------------------------------------------------- main loop
def batch_names(key: str) -> tuple[str | None, ...]:
  """Logical names of a global train-batch array's leading dims (position_ids is (3, B, L))."""
  return (None, "batch") if key == "position_ids" else ("batch",)


def _to_global(batch: dict[str, np.ndarray], mesh, shard: distributed.DataShard) -> dict[str, jax.Array]:
  """This process's rows (local_batch, ...) -> global arrays (global_batch, ...) sharded over the mesh."""
  out = {}
  for k, v in batch.items():
    if k == "skip_counts":
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
  spec = example_spec(config, model.config)
  depth_grid = spec.token_grid(model.config.vision.image_token_pixels)
  train_sources, weights, eval_sources = data_sources(config, workdir)
  num_train = sum(len(pipeline.load_records(s)[0]) for s in train_sources[:1])
  total_steps = config.train.total_steps or max(1, math.ceil(config.train.epochs * num_train / config.train.global_batch))
  ds = pipeline.make_dataset(train_sources, weights, spec, model.config, tokenizer, processor,
                             seed=config.data.shuffle_seed)
  shard = distributed.data_shard(mesh, config.train.global_batch)  # this process's rows of each batch
  data_iter = iter(pipeline.batched(shard.select(ds), shard.local_batch, config.data.num_workers))

  boxed = abstract_params(model, **depthvlm_dummy_inputs(model.config), boxed=True)
  param_sh = sharding.logical_shardings(boxed, mesh)
  mask = optim.trainable_mask(nn.unbox(boxed), list(map(tuple, config.train.trainable)))
  train_sh, frozen_sh = optim.split_params(param_sh, mask)
  schedule = optim.learning_rate_schedule(config.train.lr, total_steps, config.train.warmup_fraction)
  optimizer = optim.make_optimizer(schedule, config.train.grad_clip, config.train.weight_decay)

  rng = jax.random.key(config.train.seed)
  mgr = checkpoints.manager(workdir / "checkpoints", config.keep_ckpts)
  params = initial_params(config, model, param_sh, rng) if mgr.latest_step() is None else None
  if params is None:  # own checkpoint: build shapes only, restore below
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed), param_sh)
  trainable, frozen = optim.split_params(params, mask)
  opt_like = checkpoints.optimizer_state_like(optimizer, trainable, mesh)  # sharded like the params
  opt_state = opt_like if isinstance(jax.tree.leaves(trainable)[0], jax.ShapeDtypeStruct) else \
      jax.jit(optimizer.init, out_shardings=jax.tree.map(lambda s: s.sharding, opt_like))(trainable)
  state = initial_state(trainable, opt_state)
  start = mgr.latest_step()
  if start is not None:
    start, state, frozen, damaged = checkpoints.restore_latest(mgr, state, frozen, data_iter)
    if damaged and distributed.is_main():
      moved = checkpoints.set_aside(mgr, damaged, workdir / "checkpoints_damaged")
      log.warning("damaged checkpoint step(s) %s moved to %s; resuming from step %d", damaged,
                  ", ".join(map(str, moved)), start)
    distributed.barrier("checkpoint_fallback")
    if damaged and not distributed.is_main():
      mgr.reload()
    log.info("resumed from %s step %d", workdir, start)
    if changes:
      log.info("resuming with changed settings: %s", "; ".join(changes))
  elif config.resume:
    rmgr = checkpoints.manager(pathlib.Path(config.resume) / "checkpoints", config.keep_ckpts)
    _, state, frozen, _ = checkpoints.restore_latest(rmgr, state, frozen, data_iter)
  if distributed.is_main():  # the run's record changes only now that its parameters are in place
    tmp = workdir / "config.json.tmp"
    tmp.write_text(config.to_json_best_effort(indent=2))
    os.replace(tmp, workdir / "config.json")

  replicated = sharding.activation_sharding(mesh)
  state = jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
                       else jax.device_put(x, replicated), state)
  train_step = jit_train_step(config, model, optimizer, mesh, jax.tree.map(lambda x: x.sharding, state), depth_grid)
  eval_examples = {name: prepared_eval_examples(src, pipeline.ExampleSpec(spec.image_size, spec.seq_len, False,
                                                                          random_crop=False),
                                                model.config, tokenizer, processor)
                   for name, src in eval_sources.items()}
  skip_totals = np.zeros(len(SKIP_REASONS), np.int64)
  first = int(state["step"])
  metrics = MetricsLog(workdir, start, enabled=distributed.is_main())
  results: dict[str, Any] = {}
  bar = tqdm.tqdm(range(first, total_steps), initial=first, total=total_steps, desc=f"stage {config.stage}",
                  dynamic_ncols=True, disable=not distributed.is_main(), unit="step")
  t0 = time.time()
  for step in bar:
    batch = next(data_iter)
    skip_totals += batch["skip_counts"].sum(0)
    if config.stage == 2 and config.train.lm_positions:
      check_label_budget(batch["labels"], config.train.lm_positions, step + 1)
    state, m = train_step(state, frozen, _to_global(batch, mesh, shard))
    done = step + 1
    if int(state["nonfinite"]) >= config.train.max_nonfinite_steps:
      mgr.wait_until_finished()
      metrics.close()
      raise NonFiniteError(f"{int(state['nonfinite'])} consecutive non-finite steps (loss, gradient or update) at step {done} "
                           f"(train.max_nonfinite_steps={config.train.max_nonfinite_steps}); stopping. Last good "
                           f"checkpoint: step {mgr.latest_step()} in {workdir / 'checkpoints'}")
    if done % config.log_every == 0 or done == total_steps:
      row = {k: float(v) for k, v in m.items()}
      row.update(lr=float(schedule(done - 1)), skipped_samples=counts_to_dict(distributed.process_sum(skip_totals)),
                 skipped_updates=int(state["skipped_updates"]),
                 steps_per_s=(done - first) / max(time.time() - t0, 1e-9))
      bar.set_postfix(loss=f"{row['loss']:.4f}", depth=f"{row['depth_loss']:.4f}", lm=f"{row['lm_loss']:.3f}",
                      lr=f"{row['lr']:.2e}", gnorm=f"{row['grad_norm']:.3f}", skipped=row["skipped_updates"])
      metrics.write(done, row)
    if (config.eval_every and done % config.eval_every == 0) or done == total_steps:
      full = optim.merge_params(state["params"], frozen)
      for name, examples in eval_examples.items():
        results[name] = evaluate_depth(model, full, examples, depth_grid, config.train.global_batch, mesh)
        bar.write(f"step {done} eval {name}: delta1 {results[name]['delta1']:.4f} (best constant "
                  f"{results[name]['best_constant_delta1']:.4f} at {results[name]['best_constant_m']:.2f} m)")
        metrics.write(done, results[name], prefix=f"eval/{name}")
    # Only good states are checkpointed: during a streak of refused updates the last good checkpoint stays the latest.
    if (done % config.ckpt_every == 0 or done == total_steps) and int(state["nonfinite"]) == 0:
      checkpoints.save(mgr, done, state, frozen, data_iter)
  bar.close()
  mgr.wait_until_finished()
  if config.eval_qa and config.data.kind == "synthetic":
    root = synthetic_root(config, workdir)
    full = optim.merge_params(state["params"], frozen)
    results["distance_qa"] = qa_eval.evaluate_distance_qa(
        model, full, pipeline.SourceSpec(str(root / "qa_test.jsonl"), str(root), "", "synthetic", with_depth=False),
        spec.image_size, spec.seq_len, tokenizer, processor, str(root / "qa.jsonl"), config.eval_qa,
        config.train.global_batch, config.eval_qa_new_tokens)
    qa = results["distance_qa"]
    log.info("distance QA on %d held-out questions: parse rate %.3f, MAE %s m (without the image: median "
             "distance %.3f m, median of the object's class %.3f m)", qa["n"], qa["parse_rate"], qa["mae_m"],
             qa["constant_mae_m"], qa["class_prior_mae_m"])
    metrics.write(total_steps, {k: v for k, v in qa.items() if k != "examples" and v is not None},
                  prefix="eval/distance_qa")
  metrics.close()
  results["skipped_samples"] = counts_to_dict(distributed.process_sum(skip_totals))
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
