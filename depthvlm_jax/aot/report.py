"""The report of one config on one slice: every program compiled per image bucket, with its figures.

Figures per program (all per chip):
  fits / error       whether the compiler accepted the program within HBM, else its message;
  *_gib              argument, output, temporary bytes from `memory_analysis()`; peak = arguments +
                     outputs - donated aliases + temporaries; hbm_gib is the chip's capacity;
  flops, bytes_accessed, est_step_s
                     the compiler's cost model (`cost_analysis()`, `optimal_seconds`). The cost model
                     counts a while-loop body once, so for a scanned train step the figures are
                     corrected to K x (step - update) + update, where `update` is `step.guarded_update`
                     (everything outside the micro-batch loop) compiled alone with the same shardings;
                     with `model.scan_layers` the layer loops inside are corrected first, from one
                     iteration's cost measured by two probe compiles (`programs._correct_layer_loops`).
                     est_step_s is at least the roofline (flops at peak, bytes at HBM bandwidth), plus
                     `uncosted_kernel_s` when the program calls Pallas kernels the cost model skips
                     (splash attention): their `attention_flops` at the chip's peak;
  model_flops, est_mfu
                     model FLOPs: every matmul and convolution of the program's jaxpr traced without
                     rematerialisation (scan bodies times their trip counts), per chip; MFU = model
                     FLOPs / (est_step_s x the chip's peak bf16 FLOP/s);
  images_per_s, est_hours
                     global batch / est_step_s, and the hours of one paper epoch (4.4M images);
  collectives        per kind (all-gather, all-reduce, reduce-scatter, all-to-all,
                     collective-permute): count and bytes per step from the optimised HLO, with
                     while-loop bodies multiplied by their trip counts.
Per report, `host`: its wall time and the host's peak resident memory.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Any

from depthvlm_jax.aot.chips import Chip, chip_of
from depthvlm_jax.aot.compiling import GiB
from depthvlm_jax.aot.programs import inference_programs, make_setup, train_program

PAPER_EPOCH_IMAGES = 4.4e6
PROGRAMS = ("train", "prefill", "decode")


def _finish(row: dict[str, Any], chip: Chip | None) -> dict[str, Any]:
  """Adds the chip's HBM, MFU and throughput figures."""
  row["hbm_gib"] = chip.hbm_gib if chip else None
  row["hbm_fraction"] = row["peak_gib"] / chip.hbm_gib if chip and row.get("peak_gib") else None
  if row.get("fits") and not row.get("flops"):  # no cost model at all: count the model's own FLOPs
    row["flops"] = row["model_flops"]
  if chip is not None and row.get("fits") and row["peak_gib"] > chip.hbm_gib:
    row["fits"] = False
    row["error"] = f"peak {row['peak_gib']:.2f} GiB per chip > {chip.hbm_gib} GiB HBM"
  if not row.get("fits") or row.get("memory_only"):
    for k in ("argument_gib", "output_gib", "peak_gib", "flops", "bytes_accessed", "est_step_s", "est_mfu",
              "images_per_s", "est_hours"):
      row[k] = row.get(k) if k.endswith("_gib") else None
    row.setdefault("collectives", {})
    return row
  # The cost model's `optimal_seconds` is -1 for some programs and can be pulled low by ops it does
  # not model (measured here: a prefill reporting -0.9994 s, a 4-micro-batch step -16 s). The roofline
  # (FLOPs at peak, bytes at HBM bandwidth) bounds any real execution from below, so the estimate is
  # the larger of the two, and `est_source` says which one it is.
  roofline = max(row["flops"] / (chip.peak_tflops * 1e12), row["bytes_accessed"] / (chip.hbm_gbps * 1e9)) if chip else 0.0
  row["xla_optimal_s"] = row["est_step_s"]
  row["roofline_s"] = roofline
  row["est_source"] = "xla_optimal_seconds" if row["est_step_s"] >= roofline else "roofline"
  # XLA's TPU cost model skips Pallas kernels (the splash attention calls): neither their FLOPs nor
  # their bytes are in `flops` / `optimal_seconds`. They are charged the attention FLOPs of the same
  # program traced with the XLA form, at the chip's peak: the least time they can take with full
  # (unmasked) attention; causal blocks the kernel skips make text attention cheaper than that.
  kernel_s = 0.0
  if chip and row.get("uncosted_kernels") and row.get("attention_flops"):
    kernel_s = row["attention_flops"] / (chip.peak_tflops * 1e12)
  row["uncosted_kernel_s"] = kernel_s
  row["est_step_s"] = max(row["est_step_s"], roofline) + kernel_s
  t = row["est_step_s"]
  row["est_mfu"] = row["model_flops"] / (t * chip.peak_tflops * 1e12) if chip and t > 0 else None
  images = row.get("images_per_step", 0)
  row["images_per_s"] = images / t if images and t > 0 else None
  row["est_hours"] = PAPER_EPOCH_IMAGES / row["images_per_s"] / 3600 if row["images_per_s"] else None
  if row.get("tokens_per_step"):
    row["tokens_per_s"] = row["tokens_per_step"] / t if t > 0 else None
  return row


def sized(config, topology: str | None, devices=None):
  """(config with the mesh and micro-batches of its plan on the slice, the plan), as the trainer sizes
  a run (`train.sizing.plan_for`), with the chip's public HBM as the device memory. For
  `train.per_device_rows="auto"` the rows are the preset's for the chip (`presets.ROWS_PER_DEVICE`):
  the report compiles them instead of searching."""
  from depthvlm_jax.aot.chips import topology_devices
  from depthvlm_jax.train import sizing
  devices = topology_devices(topology) if devices is None else devices
  chip = chip_of(topology) if topology else None
  plan = sizing.plan_for(config, devices, memory_bytes=chip.hbm_gib * GiB if chip else None)
  return sizing.with_plan(config, plan), plan


def report(config, topology: str, programs=PROGRAMS, devices=None,
           buckets: tuple[str, ...] = (), memory_only: bool = False) -> dict[str, Any]:
  """{"topology", "chips", "mesh", "config", "buckets", "programs": {"NAME@HxW": figures}} for one config
  on one slice, every program compiled for each bucket (or the `buckets` named "HxW"). memory_only:
  see `train_program`."""
  t0 = time.time()
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown or not programs:
    raise ValueError(f"--programs={','.join(programs)}: expected one or more of {', '.join(PROGRAMS)}")
  if devices is None:
    from depthvlm_jax.aot.chips import topology_devices
    devices = topology_devices(topology)
  config, plan = sized(config, topology, devices)
  s = make_setup(config, topology, devices)
  specs = [sp for sp in s.specs if not buckets or sp.name in buckets]
  if not specs:
    raise ValueError(f"--buckets={','.join(buckets)}: none of the config's buckets "
                     f"{[sp.name for sp in s.specs]}")
  out: dict[str, Any] = {"topology": topology, "chips": int(s.mesh.devices.size), "mesh": dict(s.mesh.shape),
                         "preset": config.preset, "stage": config.stage,
                         "buckets": [{"image_size": list(sp.image_size), "seq_len": sp.seq_len} for sp in specs],
                         "global_batch": config.train.global_batch, "micro_batches": config.train.micro_batches,
                         "per_device_rows": plan.per_device_rows, "plan": plan.line(), "programs": {}}
  for spec in specs:
    sb = s.for_bucket(spec)
    if "train" in programs:
      out["programs"][f"train@{spec.name}"] = _finish(train_program(sb, memory_only), s.chip)
    if {"prefill", "decode"} & set(programs):
      wanted = tuple(p for p in ("prefill", "decode") if p in programs)
      for name, row in inference_programs(sb, memory_only=memory_only, programs=wanted).items():
        out["programs"][f"{name}@{spec.name}"] = _finish(row, s.chip)
  # what the report cost this host: wall time, and peak resident memory (ru_maxrss is in KiB on Linux)
  out["host"] = {"report_s": round(time.time() - t0, 1),
                 "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
  return out


def _fmt(x, spec=".2f"):
  return "-" if x is None else format(x, spec)


def table(reports: list[dict[str, Any]]) -> str:
  head = ("| preset | stage | slice (chips) | mesh d,f,t | program | fits | arg GiB | temp GiB | peak GiB / HBM | "
          "compile s | est step s | est MFU | images/s | epoch h | collectives (count, GiB) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in reports:
    mesh = r.get("mesh", {})
    for name, p in r.get("programs", {}).items():
      coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / GiB:.2f})" for k, v in p.get("collectives", {}).items())
      fits = "yes" if p.get("fits") else "**no**"
      peak = f"{_fmt(p.get('peak_gib'))} / {_fmt(p.get('hbm_gib'), 'g')}"
      if not p.get("fits") and p.get("temp_gib") is not None and p.get("peak_gib") is None:
        peak = f"temp {p['temp_gib']:.1f} / {_fmt(p.get('hbm_gib'), 'g')}"
      mfu = None if p.get("est_mfu") is None else 100 * p["est_mfu"]
      lines.append(f"| {r['preset']} | {r['stage']} | {r['topology']} ({r['chips']}) | "
                   f"{mesh.get('data', '-')},{mesh.get('fsdp', '-')},{mesh.get('tensor', '-')} | {name} | {fits} | "
                   f"{_fmt(p.get('argument_gib'))} | {_fmt(p.get('temp_gib'))} | {peak} | {_fmt(p.get('compile_s'), '.0f')} | "
                   f"{_fmt(p.get('est_step_s'), '.3g')} | {_fmt(mfu, '.0f')}{'%' if mfu is not None else ''} | "
                   f"{_fmt(p.get('images_per_s'), '.0f')} | {_fmt(p.get('est_hours'), '.1f')} | {coll or '-'} |")
  return "\n".join(lines)


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x
