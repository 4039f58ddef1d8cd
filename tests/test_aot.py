"""The ahead-of-time TPU compile report (`depthvlm_jax.aot`), compiled with libtpu on this CPU host.

The default preset's programs are compiled for a v5e 2x2 slice (4 chips), once per image bucket
(`train@96x128`, ...): every key of the report is present and sane, per-chip argument bytes equal the sharded parameter + optimizer + batch shards, an
oversized batch is reported as not fitting with the compiler's own message. The train program is the
trainer's pair: `accumulate` (one micro-batch) and `apply`. The loop-cost corrections
and `--memory_only` are in `test_aot_loops.py`.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) compiles for TPU slices: pip install -e '.[tpu]'")

from configs import stage1, stage2  # noqa: E402
from depthvlm_jax import aot  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"
B0, B1 = "96x128", "128x96"  # the default preset's buckets
KEYS = ("fits", "hbm_gib", "argument_gib", "temp_gib", "output_gib", "peak_gib", "compile_s", "flops",
        "bytes_accessed", "est_step_s", "est_mfu", "images_per_s", "est_hours", "collectives")


def _config(module, **overrides):
  c = module.get_config("default")
  c.unlock()
  for path, value in overrides.items():
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c.lock()


@pytest.fixture(scope="module")
def stage1_cli(tmp_path_factory):
  """The issue's bar: the CLI on the default stage-1 config for v5e:2x2 exits 0 and writes the JSON
  (first bucket only; `test_stage2_train_step_compiles` covers every bucket)."""
  out = tmp_path_factory.mktemp("aot") / "stage1.json"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-m", "depthvlm_jax.aot", "--config=configs/stage1.py",
                         f"--topology={TOPOLOGY}", f"--json={out}", f"--buckets={B0}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  return json.loads(out.read_text()), proc.stdout


def _check_program(name, p):
  for k in KEYS:
    assert k in p, (name, k)
  assert p["fits"] is True and p["error"] is None
  assert p["hbm_gib"] == 16  # v5e
  assert 0 < p["argument_gib"] and 0 <= p["temp_gib"] and 0 < p["output_gib"]
  own = p["argument_gib"] + p["output_gib"] - p["alias_gib"] + p["temp_gib"]
  if name.startswith("train"):  # accumulate's figures; the update's peak adds the next micro-batch, or is apply's
    assert p["accumulate_peak_gib"] == pytest.approx(own) and 0 < p["next_micro_batch_gib"]
    assert p["peak_gib"] == pytest.approx(max(own + p["next_micro_batch_gib"], p["apply"]["peak_gib"]))
    assert p["apply"]["fits"] and p["apply"]["compile_s"] > 0
  else:
    assert p["peak_gib"] == pytest.approx(own)
  assert p["peak_gib"] < p["hbm_gib"]
  assert p["compile_s"] > 0 and p["flops"] > 0 and p["bytes_accessed"] > 0
  assert p["est_step_s"] > 0 and p["est_step_s"] >= p["roofline_s"] > 0
  assert 0 < p["est_mfu"] <= 1
  # the compiler's FLOPs cover the model's matmuls and convolutions (remat and elementwise work add more)
  assert p["flops"] >= 0.9 * p["model_flops"]
  for kind, c in p["collectives"].items():
    assert kind in aot.COLLECTIVES and c["count"] > 0 and c["bytes"] >= 0
  # the splash kernels (TPU attention) are not in the cost model: their attention FLOPs at peak are added
  if not name.startswith("decode"):
    assert p["uncosted_kernels"] > 0 and 0 < p["attention_flops"] < p["model_flops"]
    assert p["uncosted_kernel_s"] == pytest.approx(p["attention_flops"] / (aot.chip_of(TOPOLOGY).peak_tflops * 1e12))
    assert p["est_step_s"] == pytest.approx(max(p["xla_optimal_s"], p["roofline_s"]) + p["uncosted_kernel_s"])
  else:  # the KV-cache step takes the XLA form
    assert p["uncosted_kernels"] == 0 and p["uncosted_kernel_s"] == 0


@pytest.mark.slow
def test_cli_stage1_reports_every_program(stage1_cli):
  report, stdout = stage1_cli
  assert report["topology"] == TOPOLOGY and report["chips"] == 4
  assert set(report["programs"]) == {f"train@{B0}", f"prefill@{B0}", f"decode@{B0}"}
  assert report["buckets"] == [{"image_size": [96, 128], "seq_len": 128}]
  for name, p in report["programs"].items():
    _check_program(name, p)
  train = report["programs"][f"train@{B0}"]
  assert train["images_per_s"] == pytest.approx(8 / train["est_step_s"])
  assert train["est_hours"] == pytest.approx(4.4e6 / train["images_per_s"] / 3600)
  assert report["programs"][f"decode@{B0}"]["tokens_per_s"] > 0
  assert "| default | 1 | v5e:2x2 (4) |" in stdout  # the printed table
  assert report["host"]["report_s"] > 0 and report["host"]["peak_rss_gib"] > 0


@pytest.mark.slow
def test_argument_bytes_are_the_sharded_state_and_batch(stage1_cli):
  """Per-chip argument bytes of `accumulate` == one device's shards of params, optimizer state, frozen
  params, gradient accumulator, micro-batch and per-row counts."""
  report, _ = stage1_cli
  train = report["programs"][f"train@{B0}"]
  groups = train["argument_shard_bytes"]
  assert set(groups) == {"state", "frozen", "accumulator", "batch", "counts"}
  # the compiler's accounting equals our shards (in the chip's tiled layout), to the byte
  assert train["argument_bytes"] == sum(groups.values())
  # and those are the shards of the trainer's shardings: unpadded shard bytes within the tile padding
  s = aot.make_setup(_config(stage1), TOPOLOGY)
  ti = aot.train_inputs(s)

  def shard_bytes(tree):
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

  for name, tree in (("state", ti.state), ("frozen", ti.frozen), ("accumulator", ti.accumulator), ("batch", ti.batch),
                     ("counts", ti.counts)):
    assert shard_bytes(tree) <= groups[name], name
  # tiles pad the minor dims: a lot for the tiny head's 3x3 kernels, little for the large frozen weights
  assert groups["frozen"] <= 1.2 * shard_bytes(ti.frozen)
  # the micro-batch (here the whole batch: one micro-batch) is split over the 4 data shards (not replicated)
  full_batch = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(ti.batch))
  assert shard_bytes(ti.batch) * 4 == pytest.approx(full_batch, rel=0.01)


@pytest.mark.slow
def test_stage2_train_step_compiles():
  """Stage 2's step, for the portrait bucket (the CLI fixture compiles the landscape one; the prefill and
  decode programs are the same model's as stage 1's)."""
  c = _config(stage2)
  report = aot.report(c, TOPOLOGY, programs=("train",), buckets=(B1,))
  assert report["stage"] == 2 and set(report["programs"]) == {f"train@{B1}"}
  p = report["programs"][f"train@{B1}"]
  _check_program(f"train@{B1}", p)
  # stage 2 trains the LLM: its gradients cross the batch shards (all-reduce / reduce-scatter)
  assert set(p["collectives"]) & {"all-reduce", "reduce-scatter"}
  # a portrait bucket is the same number of pixels as the landscape one: the same work (traced, not compiled)
  s = aot.make_setup(c, TOPOLOGY)
  landscape = s.for_bucket(next(sp for sp in s.specs if sp.name == B0))
  assert p["model_flops"] == pytest.approx(aot.train_model_flops(landscape), rel=0.02)


@pytest.mark.slow
def test_oversized_batch_is_reported_not_raised():
  c = _config(stage1, **{"data.buckets": ((2048, 2048),), "train.global_batch": 64, "data.seq_len": 4200})
  report = aot.report(c, TOPOLOGY, programs=("train",))
  p = report["programs"]["train@2048x2048"]
  assert p["fits"] is False
  assert "HBM" in p["error"] or "memory" in p["error"].lower(), p["error"]
  for k in KEYS:
    assert k in p


def test_collective_stats_multiply_loop_bodies():
  hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[32]{0} all-gather(%x), dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%i, %x)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %ar = bf16[4,4]{1,0} all-reduce(%a), to_apply=%add
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %s = ((f32[8]), f32[16]) all-gather-start(%a), dimensions={0}
  ROOT %d = f32[16]{0} all-gather-done(%s)
}
"""
  stats = aot.collective_stats(hlo)
  assert stats["all-gather"] == {"count": 5 + 1, "bytes": 5 * 32 * 4 + 16 * 4}
  assert stats["all-reduce"] == {"count": 1, "bytes": 16 * 2}
  # no known_trip_count (as libtpu prints loops): the trips are the condition's bound
  tpu_form = hlo.replace(', backend_config={"known_trip_count":{"n":"5"}}', "").replace(
      "  ROOT %c = pred[] constant(true)",
      "  %n = s32[]{:T(128)} constant(7)\n  %i = s32[] get-tuple-element(%p), index=0\n"
      "  ROOT %c = pred[] compare(%i, %n), direction=LT")
  assert aot.collective_stats(tpu_form)["all-gather"] == {"count": 7 + 1, "bytes": 7 * 32 * 4 + 16 * 4}


def test_collective_stats_count_tpu_loops_from_their_condition():
  """libtpu's optimised HLO gives its while loops no `known_trip_count`: the trips are read off the
  loop condition. A 6-layer scan whose weights are sharded along the contraction reduces once a layer."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.array(aot.topology_devices("v5e:2x2")), ("x",))
  def layers(w, x):
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]
  w = jax.ShapeDtypeStruct((6, 512, 512), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "x", None)))
  x = jax.ShapeDtypeStruct((64, 512), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  hlo = jax.jit(layers).lower(w, x).compile().as_text()
  assert hlo.count(" while(") == 1 and "known_trip_count" not in hlo
  assert aot.collective_stats(hlo)["all-reduce"] == {"count": 6, "bytes": 6 * 64 * 512 * 4}


def test_bad_topology_is_a_one_line_error(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-m", "depthvlm_jax.aot", "--config=configs/stage1.py", "--topology=v9z:2x2"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert "--topology='v9z:2x2'" in proc.stderr and "v5p" in proc.stderr


def test_unknown_program_is_a_clear_error():
  """A misspelt --programs entry fails before any work, naming the flag and what it takes."""
  with pytest.raises(ValueError, match=r"--programs=train,prefil: expected one or more of train, prefill, decode"):
    aot.report(_config(stage1), TOPOLOGY, programs=("train", "prefil"))


def test_sweep_rows_are_sized_like_the_trainer():
  """A sweep row is the preset alone: the report sizes it for the slice with the trainer's
  derivation (`train.sizing.plan_for`, the chip's HBM), and every plan keeps the preset's global batch."""
  from depthvlm_jax.train import sizing
  from depthvlm_jax.presets import ROWS_PER_DEVICE
  for module in (stage1, stage2):
    for topology in ("v5e:2x4", "v5e:16x16", "v5p:4x4x4"):
      preset = module.get_config("paper_4b")
      config, plan = aot.report_sized(preset, topology)
      devices = len(aot.topology_devices(topology))
      assert plan.how == "auto" and plan.devices == devices and math.prod(plan.mesh.values()) == devices
      shards = devices // plan.mesh["tensor"]
      assert plan.per_device_rows * plan.micro_batches * shards == preset.train.global_batch
      assert plan.per_device_rows <= ROWS_PER_DEVICE[("4b", preset.stage)][topology.split(":")[0]]
      assert config.train.micro_batches == plan.micro_batches and config.mesh.to_dict() == plan.mesh
      assert plan.memory_bytes == aot.chip_of(topology).hbm_gib * 2**30
  # v5e 16x16: 640 rows do not split over 256 chips, 2-way tensor parallelism does
  _, plan = aot.report_sized(stage2.get_config("paper_4b"), "v5e:16x16")
  assert plan.mesh["tensor"] == 2
  # a slice too small for the state at any row count is refused before any compile
  with pytest.raises(sizing.SizingError, match="at any row count"):
    aot.report_sized(stage2.get_config("paper_8b"), "v5e:2x2")