"""Shared test settings: 8 simulated CPU devices (for sharding tests) and exact fp32 matmuls."""

import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests run on the CPU. With the tpu extra installed (tests/test_aot.py compiles for TPU slices
# through libtpu), JAX would otherwise try to start a TPU backend in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The processes the tests start (`python main.py` in the resume, multi-process and CLI tests, notebook
# kernels) share one persistent compilation cache per session: a run whose programs an earlier one
# compiled loads them (a tiny resume-test run: 151 s cold, 42 s warm; same losses bit for bit). The
# controller makes the folder before the xdist workers start, so they and their children inherit it;
# the tests' own processes keep compiling (some count compilations), hence the override below.
_OWN_CACHE = "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="depthvlm-jax-test-compile-cache-")
jax.config.update("jax_compilation_cache_dir", None)

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


@pytest.fixture(scope="module")
def gcs():
  """(environment for subprocesses, URL) of a Cloud Storage API server on localhost with bucket
  `test-bucket` (tests/gcs_emulator.py); this process's gs:// clients use it during the module."""
  pytest.importorskip("gcp_storage_emulator")
  from tests import gcs_emulator
  with gcs_emulator.running() as url, gcs_emulator.pointed_at(url) as env:
    yield dict(os.environ, JAX_PLATFORMS="cpu", **env), url


def pytest_collection_modifyitems(config, items):
  here = pathlib.Path(__file__).resolve().parent
  def rank(item):
    rel = item.path.resolve().relative_to(here).as_posix() if item.path.resolve().is_relative_to(here) else ""
    return SLOW_FILES_FIRST.index(rel) if rel in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)
  items.sort(key=rank)  # stable: each file's tests keep their order


def pytest_configure(config):
  # The fast tier, `python -m pytest -q -n 2 --dist loadfile -m "not slow" tests`, leaves these out.
  config.addinivalue_line("markers", "slow: compiles a model, trains, or starts processes (minutes); "
                          "left out by -m 'not slow', always run by CI")
  # qwix 0.1.8 checks isinstance against flax's deprecated alias on every adapted layer (thousands
  # of identical warnings per LoRA / int8 test); nothing of ours to change
  config.addinivalue_line("filterwarnings", "ignore:'VariableState' was removed:DeprecationWarning")
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order above
    config.option.loadscopereorder = False


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
