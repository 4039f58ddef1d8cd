"""A regular (not editable) install works on its own: the installed CLIs start from any directory.

`pip install .` installs `depthvlm_jax` and `data_pipelines` only; nothing installed may need the
repository's `configs/` folder or files beside the checkout. The install goes into a fresh target
folder (dependencies come from the test environment), and each CLI runs from an empty directory.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
  target = tmp_path_factory.mktemp("site")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                  str(target), str(ROOT)], check=True, cwd=tmp_path_factory.mktemp("build_cwd"))
  return target


@pytest.mark.parametrize("module", ["depthvlm_jax.aot", "depthvlm_jax.demo", "depthvlm_jax.predict",
                                    "depthvlm_jax.evaluate", "depthvlm_jax.export"])
def test_installed_cli_help_from_another_directory(installed, tmp_path, module):
  env = dict(os.environ, PYTHONPATH=str(installed), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
  # absl's --help exits with status 1 after printing the usage (its convention); argparse's with 0
  assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "--" in out.stdout  # the usage and flags are printed
  # the module that ran is the installed copy, not the checkout
  probe = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
  assert pathlib.Path(probe.stdout.strip()).is_relative_to(installed), probe.stdout


def test_installed_package_ships_its_data_and_no_configs(installed):
  assert (installed / "depthvlm_jax" / "gpu_targets" / "h100_sxm.txtpb").is_file()
  assert not (installed / "configs").exists()
  assert (installed / "depthvlm_jax" / "presets.py").is_file()
