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


# The slowest test files (minutes each on the 2-core CI machine), started first: with two workers and
# one file per worker (`--dist loadfile`), a long file handed out last leaves the other worker idle
# while it runs (pytest-xdist's default order, most tests first, put `train/test_resume.py` last).
# Files keep their own test order; the rest follow in collection order.
SLOW_FILES_FIRST = (
    "train/test_resume.py", "train/test_step.py", "test_aot.py", "model/test_depthvlm.py",
    "train/test_multiprocess.py", "test_export.py", "test_full_size.py", "train/test_qa_eval.py",
    "evaluation/test_model.py", "test_notebooks.py", "train/test_frozen_dtype.py", "test_aot_loops.py",
)


def pytest_collection_modifyitems(config, items):
  here = pathlib.Path(__file__).resolve().parent
  def rank(item):
    rel = item.path.resolve().relative_to(here).as_posix() if item.path.resolve().is_relative_to(here) else ""
    return SLOW_FILES_FIRST.index(rel) if rel in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)
  items.sort(key=rank)  # stable: each file's tests keep their order


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order above
    config.option.loadscopereorder = False
