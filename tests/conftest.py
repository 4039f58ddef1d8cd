"""Shared test settings: 8 simulated CPU devices (for sharding tests) and exact fp32 matmuls."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests run on the CPU. With the tpu extra installed (tests/test_aot.py compiles for TPU slices
# through libtpu), JAX would otherwise try to start a TPU backend in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
