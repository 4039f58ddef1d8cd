"""A run sizes itself from its devices (`depthvlm_jax.train.sizing`): the derivation for 1 to 256
devices (pure), the mesh over several slices, the `auto` search against a memory budget on 8
simulated CPU devices, and a restart that reads the cached choice and a warm compilation cache."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from jax._src import compilation_cache

from depthvlm_jax import presets, sharding
from depthvlm_jax.model.config import ConfigError
from depthvlm_jax.runs.model_from_config import build_model
from depthvlm_jax.train import config_checks, sizing
from depthvlm_jax.train.data import example_specs

GiB = 2**30


@pytest.mark.parametrize("devices", [1, 8, 64, 256])
@pytest.mark.parametrize("global_batch", [2560, 640])
def test_derive_splits_the_global_batch(devices, global_batch):
  for rows in (1, 5, 10, 40):
    plan = sizing.derive(global_batch, rows, devices)
    shards = global_batch // (plan.per_device_rows * plan.micro_batches)
    assert math.prod(plan.mesh.values()) == devices
    assert shards * plan.mesh["tensor"] == devices
    assert plan.per_device_rows * plan.micro_batches * shards == global_batch  # the batch is kept
    assert plan.per_device_rows <= rows
    # the fewest micro-batches: any fewer that split the batch would put more rows on a device
    per_device = global_batch // shards
    assert all(per_device // k > rows for k in range(1, plan.micro_batches) if per_device % k == 0)
    assert f"{plan.micro_batches} micro-batches" in plan.line() and f"global batch {global_batch}" in plan.line()


def test_derive_tensor_parallel_only_when_the_batch_does_not_split():
  assert sizing.derive(2560, 10, 256).mesh == {"data": 1, "fsdp": 256, "tensor": 1}
  plan = sizing.derive(640, 10, 256)  # 640 rows do not split over 256 chips: 2-way tensor parallelism
  assert plan.mesh == {"data": 1, "fsdp": 128, "tensor": 2}
  assert (plan.per_device_rows, plan.micro_batches) == (5, 1)


def test_derive_data_parallel_when_the_state_fits():
  small, large = 9e9, 50e9  # a frozen 4B backbone (stage 1), a trained 4B LLM with its moments (stage 2)
  dp = sizing.derive(2560, 32, 8, memory_bytes=80 * GiB, state_bytes=small)
  assert dp.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
  fsdp = sizing.derive(640, 20, 8, memory_bytes=80 * GiB, state_bytes=large)
  assert fsdp.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
  assert sizing.derive(2560, 8, 8, memory_bytes=16 * GiB, state_bytes=small).mesh["fsdp"] == 8
  assert sizing.derive(2560, 8, 8).mesh["fsdp"] == 8  # memory unknown: FSDP


def test_batch_that_cannot_split_names_the_nearest_that_can():
  with pytest.raises(sizing.SizingError, match="global_batch=650 does not split over 256 devices.*640 and 672"):
    sizing.derive(650, 10, 256)
  assert sizing.derive(7, 1, 8).mesh["tensor"] == 8  # one batch shard, the model over all 8
  with pytest.raises(sizing.SizingError, match="global_batch=7 does not split over 8 devices.*are 4 and 8$"):
    sizing.derive(7, 1, 8, tensor=2)  # mesh.tensor given


def test_state_that_fits_no_row_count_is_refused_before_work():
  with pytest.raises(sizing.SizingError, match=r"needs 111.8 GiB.*at any row count: it needs at least 9 such devices"):
    sizing.derive(640, 1, 8, memory_bytes=16 * GiB, state_bytes=120e9)
  # a device holds two micro-batches, not the whole batch: 320 rows of 45 MB per device fit next to the
  # state as 320 micro-batches of one row; rows so large that two of them do not fit are refused
  assert sizing.derive(2560, 1, 8, memory_bytes=16 * GiB, state_bytes=9e9, row_bytes=45e6).micro_batches == 320
  with pytest.raises(sizing.SizingError, match=r"2 micro-batches of one row 12.57 GiB.*at least 9 such devices"):
    sizing.derive(2560, 1, 8, memory_bytes=16 * GiB, state_bytes=9e9, row_bytes=6.75e9)


def test_search_rows_bisects_to_the_largest_that_fits():
  plan = sizing.derive(2560, 320, 8)  # 320 rows per device: every divisor of 320 is a candidate
  calls = []

  def peak_of(p):
    calls.append(p.per_device_rows)
    return None if p.per_device_rows > 64 else 1e9 + p.per_device_rows * 1e8  # refused above 64 rows

  for budget_rows in (1, 5, 20, 64, 320):
    budget = 1e9 + budget_rows * 1e8
    calls.clear()
    got, peaks = sizing.search_rows(plan, peak_of, budget)
    assert got.per_device_rows == min(budget_rows, 64) and got.how == "auto"
    assert got.per_device_rows * got.micro_batches == 320 and got.peak_bytes == peaks[got.per_device_rows]
    assert len(calls) <= 5 and set(calls) == set(peaks)  # bisection over the 14 divisors
  with pytest.raises(sizing.SizingError, match="even 1 row per device"):
    sizing.search_rows(plan, peak_of, 1e8)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What `mesh_utils` reads of a device of a multi-slice job (no TPU here)."""

  id: int
  slice_index: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def test_mesh_over_two_slices_puts_data_over_dcn():
  devices = [FakeDevice(i, slice_index=i // 8, process_index=i // 4) for i in range(16)]
  assert sharding.slice_count(devices) == 2
  plan = sizing.derive(2560, 40, 16, slices=2, memory_bytes=16 * GiB, state_bytes=9e9)  # FSDP inside slices
  assert plan.mesh == {"data": 2, "fsdp": 8, "tensor": 1}
  grid = sharding.device_grid([plan.mesh[a] for a in sharding.MESH_AXES], devices)
  slices = np.vectorize(lambda d: d.slice_index)(grid)
  assert grid.shape == (2, 8, 1)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()  # data crosses the slices, fsdp stays in one
  dp = sizing.derive(2560, 40, 16, slices=2, memory_bytes=80 * GiB, state_bytes=9e9)
  grid = sharding.device_grid([dp.mesh[a] for a in sharding.MESH_AXES], devices)
  assert grid.shape == (16, 1, 1) and sorted(d.id for d in grid.flat) == list(range(16))
  with pytest.raises(ValueError, match="multiple of the 2 slices"):
    sharding.device_grid([1, 16, 1], devices)


def _config(**train):
  c = presets.get_config(1, "default")
  c.update_from_flattened_dict({f"train.{k}": v for k, v in train.items()})
  return c


def test_rows_setting_is_checked():
  with pytest.raises(ConfigError, match="train.per_device_rows='many': expected 0.*'auto'"):
    config_checks.validate_config(_config(per_device_rows="many"))
  with pytest.raises(ConfigError, match="train.memory_fraction=1.5"):
    config_checks.validate_config(_config(memory_fraction=1.5))


def test_plan_run_on_8_devices():
  config, mesh, plan = config_checks.plan_run(_config())  # "0": the preset's mesh and micro-batches
  assert plan.how == "config" and dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  config, mesh, plan = config_checks.plan_run(_config(global_batch=32, per_device_rows="2"))
  assert (plan.per_device_rows, plan.micro_batches) == (2, 2) and config.train.micro_batches == 2
  assert dict(mesh.shape) == plan.mesh and config.mesh.to_dict() == plan.mesh
  # "auto" on the CPU without a memory figure keeps the config's micro-batches
  _, _, plan = config_checks.plan_run(_config(per_device_rows="auto"))
  assert plan.how.startswith("config") and "memory_budget_gib" in plan.how
  c = _config(global_batch=6, per_device_rows="4")
  c.mesh.tensor = 2
  with pytest.raises(ConfigError, match="invalid config: train.global_batch=6 does not split over 8 devices.*4 and 8$"):
    config_checks.plan_run(c)


class CompileCounter:
  """Programs compiled, and programs loaded from the persistent cache, while active (JAX records its
  backend-compile event for both)."""

  def __enter__(self):
    self.requests = self.hits = 0
    self._on = True

    def duration(name, *_, **__):
      if self._on and name == "/jax/core/compile/backend_compile_duration":
        self.requests += 1

    def event(name, **_):
      if self._on and name == "/jax/compilation_cache/cache_hits":
        self.hits += 1

    jax.monitoring.register_event_duration_secs_listener(duration)
    jax.monitoring.register_event_listener(event)
    return self

  def __exit__(self, *exc):
    self._on = False

  @property
  def compiles(self) -> int:
    return self.requests - self.hits


@pytest.mark.slow
def test_auto_search_fits_the_budget_and_a_restart_reads_its_choice(tmp_path):
  """On 8 CPU devices with a memory budget: a large budget gets the most rows per device (4 of
  32 / 8); a budget just under that peak gets fewer rows, within it; a restart compiles nothing.
  Both budgets are under twice the train state, so both plans are FSDP: only the rows differ."""
  model = build_model(_config())
  state = sizing.state_bytes(_config(), model, jax.devices())
  large = 0.99 * state / (0.85 * sizing.DP_SHARE) / GiB
  config, mesh, first = config_checks.plan_run(_config(global_batch=32, per_device_rows="auto", memory_budget_gib=large))
  assert first.how == "auto" and first.per_device_rows == 4 and first.mesh["fsdp"] == 8
  (tmp_path / "a").mkdir()
  big, peaks, searched = sizing.settle_auto(config, first, model, mesh, tmp_path / "a")
  assert big.per_device_rows == 4 and big.micro_batches == 1 and peaks == {4: big.peak_bytes}
  # the start-up compiles reuse the program the search compiled for the largest bucket
  specs = example_specs(config, model.config)
  (largest,) = searched  # the bucket the search compiles: the largest (the first of equal ones)
  assert largest == tuple(specs[0].image_size)
  from depthvlm_jax.runs import freeze
  from depthvlm_jax.runs.model_from_config import params_like
  from depthvlm_jax.train import optim
  from depthvlm_jax.train.model_state import abstract_state
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(3e-4, 77, 0.1), 1.0, 0.0)  # the run's own
  trainable, frozen = freeze.split_params(*params_like(config, model, mesh))
  state = abstract_state(optimizer, trainable, mesh)
  with CompileCounter() as count:
    steps = sizing.compile_steps(sizing.with_plan(config, big), model, optimizer, mesh, state, frozen, specs,
                                 compiled=searched)
  assert count.compiles == len(specs) - 1 + 1  # the other buckets' `accumulate`, and `apply`
  assert steps[largest].accumulate is searched[largest]
  assert sizing.programs_peak_bytes(steps[largest]) == big.peak_bytes
  # a budget just under the 4-row peak
  budget = big.peak_bytes * 0.999
  small_config = _config(global_batch=32, per_device_rows="auto", memory_budget_gib=budget / 0.85 / GiB)
  small_config, mesh, plan = config_checks.plan_run(small_config)
  assert plan.mesh == first.mesh
  (tmp_path / "b").mkdir()
  small, peaks, _ = sizing.settle_auto(small_config, plan, model, mesh, tmp_path / "b")
  assert small.per_device_rows < 4 and small.peak_bytes <= budget
  assert small.per_device_rows * small.micro_batches == 4 and peaks[4] > budget
  assert all(peaks[r] > budget for r in peaks if r > small.per_device_rows)
  # a restart in the same workdir: the cached choice, no compile
  with CompileCounter() as count:
    again, peaks, searched = sizing.settle_auto(small_config, plan, model, mesh, tmp_path / "b")
  assert (again.per_device_rows, again.micro_batches, again.peak_bytes) == (
      small.per_device_rows, small.micro_batches, small.peak_bytes)
  assert peaks == {} and searched == {} and again.how == "auto (cached)" and count.requests == 0
  assert "auto (cached)" in again.line() and "GiB per device" in again.line()
  # other devices or memory: searched again
  other, peaks, _ = sizing.settle_auto(config, first, model, mesh, tmp_path / "b")
  assert peaks and other.how == "auto"


@pytest.mark.slow
def test_every_bucket_compiled_at_start_and_a_restart_loads_them(tmp_path, monkeypatch):
  """`compile_steps` compiles one `accumulate` per bucket and one `apply`; with the persistent cache
  on, a second start (in-memory caches cleared) compiles none of them again."""
  from depthvlm_jax.runs import freeze
  from depthvlm_jax.runs.model_from_config import params_like
  from depthvlm_jax.train import optim
  from depthvlm_jax.train.model_state import abstract_state
  config, mesh, _ = config_checks.plan_run(_config())
  model = build_model(config)
  specs = example_specs(config, model.config)
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(1e-3, 10, 0.0), 1.0, 0.0)
  like, mask = params_like(config, model, mesh)
  trainable, frozen = freeze.split_params(like, mask)
  state = abstract_state(optimizer, trainable, mesh)
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                                             "jax_persistent_cache_min_entry_size_bytes")}
  try:
    assert sizing.enable_compile_cache(str(tmp_path / "xla")) == str(tmp_path / "xla")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    jax.clear_caches()
    with CompileCounter() as cold:
      steps = sizing.compile_steps(config, model, optimizer, mesh, state, frozen, specs)
    assert sorted(steps) == sorted(tuple(b) for b in config.data.buckets)
    assert cold.compiles == len(specs) + 1 and cold.hits == 0  # one `accumulate` per bucket, one `apply`
    assert len({id(p.apply) for p in steps.values()}) == 1
    jax.clear_caches()  # a new process: nothing in memory
    with CompileCounter() as warm:
      again = sizing.compile_steps(config, model, optimizer, mesh, state, frozen, specs)
    assert warm.compiles == 0 and warm.hits == len(specs) + 1
    assert all(sizing.programs_peak_bytes(again[b]) == sizing.programs_peak_bytes(steps[b]) for b in steps)
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()
  assert sizing.enable_compile_cache("") is None
