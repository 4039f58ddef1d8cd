"""`train_and_evaluate(config, workdir)`: the training loop of both stages.

Order of work: validate the config (fail before any work) → the plan (mesh, rows per device,
micro-batches: `sizing`; with "auto" searched by compiling, before any data) → data → abstract
params with their shardings and dtypes → params from (own workdir checkpoint | `resume` |
`model_init` | `model.hf_dir` + fresh head | random init), each restored or loaded straight onto its
shards → frozen params written once → every bucket's jitted, donated train step compiled, the plan
logged → loop with logging, periodic δ1 evaluation and asynchronous checkpoints (train state +
grain iterator).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath

from data_pipelines import dataset_conf, pipeline
from data_pipelines.skips import SKIP_REASONS, SourceExhaustedError, check_skip_rates, counts_to_dict, skip_report
from depthvlm_jax.evaluation.step import jit_delta1
from depthvlm_jax.model.config import ConfigError
from depthvlm_jax.model.hub import resolve_model_dir
from depthvlm_jax.processing.image_processor import ImageProcessorConfig
from depthvlm_jax.processing.tokenizer import load_tokenizer
from depthvlm_jax.runs import checkpoints, freeze
from depthvlm_jax.runs.model_from_config import build_model
from depthvlm_jax.train import distributed, optim, qa_eval, sizing, workdir_lock
from depthvlm_jax.train.config_checks import plan_run, validate_config
from depthvlm_jax.train.data import data_sources, example_specs, synthetic_root
from depthvlm_jax.train.depth_eval import evaluate_depth, make_eval_set
from depthvlm_jax.train.metrics_log import MetricsLog
from depthvlm_jax.train.model_state import restore_or_initialise, train_processor
from depthvlm_jax.train.run_record import (DATA_COUNTS_FILE, check_resume_config, read_data_counts, read_workdir_config,
                                           write_atomic, write_data_counts, write_results)
from depthvlm_jax.train.step import max_supervised_tokens

log = logging.getLogger(__name__)
# Libraries that log every checkpoint/compile step at INFO.
NOISY_LOGGERS = ("absl", "orbax", "jax", "grain", "tensorboardX", "urllib3", "filelock")


def setup_logging(verbosity: int = 0) -> None:
  """Our INFO lines on; library INFO lines (orbax, absl, jax, grain) only with verbosity >= 1."""
  logging.getLogger().setLevel(logging.INFO)
  for name in NOISY_LOGGERS:
    logging.getLogger(name).setLevel(logging.INFO if verbosity >= 1 else logging.WARNING)


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps. Decided on the step's replicated counter, which every
  process reads with the same value, so all processes stop at the same step."""
  on_every_process = True


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains and evaluates `config` in `workdir` (resuming its own checkpoints); returns the results.

  Every config check (values, input files, the mesh against the devices) runs before anything is
  written. The workdir is locked for the run; its `config.json` is rewritten only once the
  parameters are restored or initialised, and a config whose model, stage or freeze rules differ
  from the run recorded there is refused with the differences.
  """
  dataset_conf.apply_to_train_config(config)  # data.datasets_conf -> data.train_files entries
  validate_config(config)
  config, mesh, plan = plan_run(config)
  workdir = epath.Path(workdir)  # a local directory or an object-store prefix (gs://bucket/run)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir={workdir}: exists and is not a directory")
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir, enabled=distributed.is_main()):
    return _train_and_evaluate(config, workdir, mesh, plan)


def _train_and_evaluate(config, workdir: epath.Path, mesh, plan: sizing.Plan) -> dict[str, Any]:
  has_checkpoint = (workdir / "checkpoints").is_dir() and any(
      p.name.isdigit() for p in (workdir / "checkpoints").iterdir())
  changes = check_resume_config(read_workdir_config(workdir), config, workdir) if has_checkpoint else []
  model = build_model(config)
  searched = {}  # programs the search compiled for the chosen plan, reused below
  if plan.how == "auto":  # rows per device from compiling the step, before any data is read
    try:
      plan, _, searched = sizing.settle_auto(config, plan, model, mesh, workdir)
    except sizing.SizingError as e:
      raise ConfigError(str(e)) from None
    config = sizing.with_plan(config, plan)
  hf_dir = resolve_model_dir(config.model.hf_dir) or None  # a hub id -> its snapshot folder
  tokenizer = load_tokenizer(hf_dir)
  processor = ImageProcessorConfig.from_hf_dir(hf_dir) if hf_dir else ImageProcessorConfig()
  specs = example_specs(config, model.config)
  train_sources, weights, eval_sources = data_sources(config, workdir)
  shard = distributed.data_shard(mesh, config.train.global_batch)  # this process's rows of each batch
  # Each process parses and sizes only its shard of the records; the sizes are exchanged, so every
  # process builds the same buckets, weights and streams (the same bucket at every step).
  ds = pipeline.make_dataset(train_sources, weights, specs, model.config, tokenizer, processor,
                             seed=config.data.shuffle_seed, cache_dir=str(workdir / "size_index"),
                             shard=shard.records(), gather=lambda x: distributed.shard_gather(x, shard))
  # One epoch = every record of every source once (in expectation, with the default weights).
  num_train = sum(ds.records)
  total_steps = config.train.total_steps or max(1, math.ceil(config.train.epochs * num_train / config.train.global_batch))
  what = (f"synthetic scenes in {synthetic_root(config, workdir)} (data.kind='synthetic')"
          if config.data.kind == "synthetic" else "data.train_files (data.kind='jsonl')")
  log.info("training data: %s: %d records in %d sources (%s); buckets: %s", what, num_train, len(ds.sources),
           ", ".join(f"{n} {c}" for n, c in zip(ds.sources, ds.records)),
           ", ".join(f"{k} {v:.1%}" for k, v in ds.fractions().items()))
  data_iter = iter(pipeline.batched(ds.map_datasets(shard.select), shard.local_batch, config.data.num_workers,
                                    prefetch_bytes=config.data.prefetch_bytes))

  schedule = optim.learning_rate_schedule(config.train.lr, total_steps, config.train.warmup_fraction)
  optimizer = optim.make_optimizer(schedule, config.train.grad_clip, config.train.weight_decay)
  start, state, frozen, mgr = restore_or_initialise(config, model, mesh, workdir, optimizer, data_iter)
  if start is not None:
    log.info("resumed from %s step %d", workdir, start)
    if changes:
      log.info("resuming with changed settings: %s", "; ".join(changes))
  if distributed.is_main():  # the run's record changes only now that its parameters are in place
    write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2))

  # Every bucket's step compiled now (ahead of time; a warm persistent cache loads them).
  if distributed.is_main():  # before the silence of the compiles (minutes for a paper model)
    print(f"compiling the train step for bucket{'s' if len(specs) > 1 else ''} "
          f"{', '.join('x'.join(map(str, sp.image_size)) for sp in specs)} (once per bucket, at start-up)", flush=True)
  train_steps = sizing.compile_steps(config, model, optimizer, mesh, state, frozen, specs, compiled=searched)
  plan = dataclasses.replace(plan, peak_bytes=max(sizing.programs_peak_bytes(c) for c in train_steps.values()))
  log.info("%s", plan.line())
  # Held-out δ1: streamed sets, one step built for the run (compiled once per bucket) at the params'
  # shardings. Every held-out record is resized (aspect kept) into the first bucket.
  eval_specs = example_specs(config, model.config, with_answer=False)
  param_sh = jax.tree.map(lambda x: x.sharding, freeze.merge_params(state["params"], frozen))
  eval_sets = [make_eval_set(name, src, eval_specs[0], model.config, tokenizer, processor, mesh,
                             config.eval_per_device_batch) for name, src in eval_sources.items()]
  eval_step = jit_delta1(model, mesh, param_sh, train_processor(config, model))
  skip_totals = np.zeros((len(ds.sources), len(SKIP_REASONS)), np.int64)
  drawn_totals = np.zeros(len(ds.sources), np.int64)
  if start is not None and distributed.is_main():  # the counts so far (process 0 holds them; sums stay right)
    counted = read_data_counts(workdir, start, list(ds.sources))
    if counted is None:
      log.warning("%s has no sample counts for step %d: drawn/skipped counts in results.json start from this "
                  "resume", workdir / DATA_COUNTS_FILE, start)
    elif counted[0].shape == skip_totals.shape:
      skip_totals, drawn_totals = counted
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
    batch = next_batch(data_iter, config, step + 1)
    skip_totals += batch["skip_counts"].sum(0)
    drawn_totals += batch["drawn_counts"].sum(0)
    bucket = batch["depth"].shape[1:]
    state, m = train_steps[bucket](state, frozen, batch, mesh, shard)
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
      full = freeze.merge_params(state["params"], frozen)
      for eval_set in eval_sets:
        name = eval_set.name
        results[name] = evaluate_depth(eval_step, full, eval_set, mesh)
        bar.write(f"step {done} eval {name}: delta1 {results[name]['delta1']:.4f} (best constant "
                  f"{results[name]['best_constant_delta1']:.4f} at {results[name]['best_constant_m']:.2f} m)")
        metrics.write(done, results[name], prefix=f"eval/{name}")
    # Only good states are checkpointed: during a streak of refused updates the last good checkpoint stays the latest.
    if ckpt_now and int(state["nonfinite"]) == 0:
      skips, drawn = distributed.process_sum(skip_totals), distributed.process_sum(drawn_totals)
      if distributed.is_main():
        write_data_counts(workdir, done, list(ds.sources), skips, drawn, set(mgr.all_steps()) | {done})
      # TensorBoard's events up to the step are stored before its checkpoint (the writer otherwise writes
      # them every few seconds): a run killed later resumes from it with every point of the curves before it.
      metrics.flush()
      checkpoints.save(mgr, done, state, None, data_iter)  # frozen params: written once, at the start
  bar.close()
  mgr.wait_until_finished()
  if config.eval_qa and config.data.kind == "synthetic":
    root = synthetic_root(config, workdir)
    full = freeze.merge_params(state["params"], frozen)
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


def summary(results: dict[str, Any], workdir: str | pathlib.Path) -> str:
  """What a person reads when a run ends: held-out δ1 against the best constant, distance QA, skipped
  samples, and where the results, checkpoints and TensorBoard logs are."""
  workdir = str(workdir) if "://" in str(workdir) else pathlib.Path(workdir).absolute()
  lines = ["training finished"]
  for name, r in results.items():
    if isinstance(r, dict) and "delta1" in r:
      lines.append(f"  {name}: delta1 {r['delta1']:.4f} on {r.get('images', '?')} images (share of pixels whose "
                   f"predicted depth is within a factor 1.25 of the true depth; a constant {r['best_constant_m']:.2f} "
                   f"m everywhere scores {r['best_constant_delta1']:.4f})")
  qa = results.get("distance_qa")
  if qa:
    mae = "none parsed" if qa["mae_m"] is None else f"{qa['mae_m']:.3f} m"
    lines.append(f"  distance QA: {qa['n']} held-out questions, answers parsed {qa['parse_rate']:.0%}, mean error "
                 f"{mae} (the median distance as the answer: {qa['constant_mae_m']:.3f} m)")
  skipped = sum((results.get("skipped_samples") or {}).values())
  lines.append(f"  skipped samples: {skipped}; skipped updates (non-finite): {results.get('skipped_updates', 0)}")
  lines += [f"results:     {workdir}/results.json", f"checkpoints: {workdir}/checkpoints",
            f"TensorBoard: tensorboard --logdir {workdir}/tensorboard"]
  return "\n".join(lines)


def next_batch(data_iter, config, step: int) -> dict[str, np.ndarray]:
  """This process's rows of the next batch, checked; a failure any process finds stops every process.

  A source that gives only unusable samples, or a reply over the LM position budget, is found by
  the process that loads it; the processes agree on it before the step runs (none is left waiting
  in the step's collectives), and all raise it, naming the process and host that found it.
  """
  batch, failure = None, None
  try:
    batch = next(data_iter)
    if config.stage == 2 and config.train.lm_positions:
      check_label_budget(batch["labels"], config.train.lm_positions, step)
  except (SourceExhaustedError, ConfigError) as e:
    failure = e
  distributed.agree_on_failure(failure, (SourceExhaustedError, ConfigError))
  return batch


def check_label_budget(labels: np.ndarray, lm_positions: int, step: int) -> None:
  """Refuses a batch whose reply is longer than the LM head's position budget (would be truncated)."""
  longest = max_supervised_tokens(labels)
  if longest > lm_positions:
    raise ConfigError(f"step {step}: a sample supervises {longest} reply tokens but train.lm_positions="
                     f"{lm_positions}; raise train.lm_positions (or set 0 for the LM head on every position)")
