"""Shared test settings: 8 simulated CPU devices (for sharding tests) and exact fp32 matmuls."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
