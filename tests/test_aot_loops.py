"""Loop costs in the ahead-of-time compile report (`depthvlm_jax.aot`), compiled with libtpu for v5e 2x2.

The cost model counts a while-loop body once; the report corrects scanned layers from extra compiles,
counts K micro-batches as K `accumulate` calls and one `apply`, and `--memory_only` skips the probes. These tests are about loops, not the depth
head, so their programs take the MLP head (a TPU compile of the tiny DPT head's step takes about 4x
longer); `test_aot.py` compiles the default preset as it is.
"""

import pytest

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) compiles for TPU slices: pip install -e '.[tpu]'")

from configs import stage1  # noqa: E402
from depthvlm_jax import aot  # noqa: E402
from depthvlm_jax.aot import programs as aot_programs  # noqa: E402
from tests.test_aot import B0, TOPOLOGY, _config  # noqa: E402

MLP = {"model.head_type": "mlp"}


@pytest.fixture(scope="module")
def one_pass():
  """The full report of the default stage-1 step (MLP head) on 8 rows in one pass."""
  report = aot.report(_config(stage1, **MLP), TOPOLOGY, programs=("train",), buckets=(B0,))
  return report["programs"][f"train@{B0}"]


@pytest.mark.slow
def test_micro_batch_cost_is_k_accumulates_and_one_apply(one_pass):
  """One update runs `accumulate` K times and `apply` once: 2 micro-batches of 4 rows cost what one
  pass over the same 8 rows costs, and one `accumulate` of them about half of that pass's."""
  assert one_pass["micro_batches"] == 1 and one_pass["global_batch"] == 8
  c = _config(stage1, **MLP, **{"train.global_batch": 8, "train.micro_batches": 2})
  two = aot.train_program(aot.make_setup(c, TOPOLOGY))
  apply = two["apply"]["flops"]
  assert apply == pytest.approx(one_pass["apply"]["flops"])  # the update does not depend on the rows
  one_accumulate = two["accumulate_cost"]["flops"]
  assert one_accumulate == pytest.approx((one_pass["flops"] - apply) / 2, rel=0.05), (one_accumulate, apply)
  assert two["flops"] == pytest.approx(2 * one_accumulate + apply)
  assert two["flops"] == pytest.approx(one_pass["flops"], rel=0.03)
  assert two["bytes_accessed"] > two["apply"]["bytes_accessed"]
  assert two["model_flops"] == pytest.approx(one_pass["model_flops"], rel=1e-6)
  # a device holds one micro-batch of 4 rows per call instead of the batch of 8
  assert two["argument_shard_bytes"]["batch"] < 0.6 * one_pass["argument_shard_bytes"]["batch"]


@pytest.mark.slow
def test_memory_only_compiles_once(one_pass, monkeypatch):
  """--memory_only: one compile of each program (`accumulate`, `apply`), the same memory as the full
  report, no cost figures."""
  full = one_pass
  calls = []
  real = aot_programs.compile_stats  # patched where the programs call it
  monkeypatch.setattr(aot_programs, "compile_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
  report = aot.report(_config(stage1, **MLP), TOPOLOGY, programs=("train",), buckets=(B0,), memory_only=True)
  p = report["programs"][f"train@{B0}"]
  assert len(calls) == 2
  assert p["fits"] and p["memory_only"]
  assert p["argument_gib"] == full["argument_gib"]
  for k in ("temp_gib", "peak_gib"):  # a separate compile of the same program
    assert p[k] == pytest.approx(full[k], rel=0.05), k
  assert p["collectives"].keys() == full["collectives"].keys()
  for k in ("flops", "bytes_accessed", "est_step_s", "est_mfu", "images_per_s", "est_hours"):
    assert p[k] is None, k


@pytest.mark.slow
def test_scanned_layer_cost_is_corrected(monkeypatch):
  """With `model.scan_layers` each tower's layer loop is counted once by the cost model; corrected from
  the probe compiles, the step costs what the unrolled step costs. A tiny model deep enough to scan:
  text layers 3-7 and vision runs 0-1, 3-5, 6-7 are loops."""
  import dataclasses
  from depthvlm_jax.model.config import Qwen3VLConfig
  small = Qwen3VLConfig.tiny

  def deeper(**kw):
    c = small(**kw)
    return dataclasses.replace(c, vision=dataclasses.replace(c.vision, depth=8, deepstack_visual_indexes=(1, 2, 5)),
                               text=dataclasses.replace(c.text, num_hidden_layers=8))

  monkeypatch.setattr(Qwen3VLConfig, "tiny", staticmethod(deeper))
  rows = {}
  for scan in (False, True):
    c = _config(stage1, **MLP, **{"model.scan_layers": scan})
    rows[scan] = aot.train_program(aot.make_setup(c, TOPOLOGY))
  unrolled, scanned = rows[False], rows[True]
  info = scanned["layer_loop_correction"]
  assert info["text_trips"] == [5] and info["vision_trips"] == [2, 3, 2]
  # loops counted once: 4 text and 4 vision block iterations missing
  assert info["reported"]["flops"] < 0.95 * unrolled["flops"], (info, unrolled["flops"])
  # the correction adds (trips - 1) iterations per run to what the compiler reported for `accumulate`
  for key in ("flops", "bytes_accessed"):
    added = 4 * info["text_iteration"][key] + 4 * info["vision_iteration"][key]
    assert scanned["accumulate_cost"][key] == pytest.approx(info["reported"][key] + added, rel=1e-9)
    assert scanned[key] == pytest.approx(scanned["accumulate_cost"][key] + scanned["apply"][key], rel=1e-9)
  # FLOPs add up per block; bytes less so: a loop body reads its layer's weights as slices of the
  # stacked weights and fuses differently from an unrolled block (measured +8.6% on this model with
  # the MLP head, +3.5% with the DPT head, whose bytes are the same in both programs)
  assert scanned["flops"] == pytest.approx(unrolled["flops"], rel=0.03), (info, unrolled["flops"])
  assert scanned["bytes_accessed"] == pytest.approx(unrolled["bytes_accessed"], rel=0.12), (info, unrolled["bytes_accessed"])
  assert scanned["model_flops"] == pytest.approx(unrolled["model_flops"], rel=1e-6)
  # the prefill: its vision runs are loops too (its text layers fill the KV cache one call each)
  prefill = {}
  for scan in (False, True):
    c = _config(stage1, **MLP, **{"model.scan_layers": scan})
    programs = aot.inference_programs(aot.make_setup(c, TOPOLOGY), programs=("prefill",))
    assert set(programs) == {"prefill"}  # the decode step is not compiled when not asked for
    prefill[scan] = programs["prefill"]
  info = prefill[True]["layer_loop_correction"]
  assert info["vision_trips"] == [2, 3, 2] and "text_iteration" not in info
  # 4 vision block iterations missing: 1.8% of this tiny prefill's FLOPs (its text and head dominate)
  missing = prefill[False]["flops"] - info["reported"]["flops"]
  assert missing > 0.01 * prefill[False]["flops"], (info, prefill[False]["flops"])
  assert abs(prefill[True]["flops"] - prefill[False]["flops"]) < 0.1 * missing, (info, prefill[False]["flops"])
