"""Installs depthvlm_jax and data_pipelines; dependencies come from requirements*.txt."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _read_requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]


setuptools.setup(
    name="depthvlm-jax",
    version="0.1.0",
    description="JAX/Flax DepthVLM: Qwen3-VL with a DPT metric-depth head.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["depthvlm_jax*", "data_pipelines*"]),
    package_data={"depthvlm_jax": ["gpu_targets/*.txtpb"]},
    install_requires=_read_requirements("requirements.txt"),
    extras_require={
        "test": _read_requirements("requirements-test.txt") + _read_requirements("requirements-tpu.txt"),
        # The TPU compiler (libtpu) for `python -m depthvlm_jax.aot` on any host, and for TPU runs.
        "tpu": _read_requirements("requirements-tpu.txt"),
        # The CUDA compiler plugin for `python -m depthvlm_jax.aot --topology=h100:8` on a host without GPUs.
        "gpu-aot": _read_requirements("requirements-gpu-aot.txt"),
    },
)
