"""Fixtures shared by the data pipeline tests (built once per session: they cost seconds)."""

import pytest

from data_pipelines import synthetic
from depthvlm_jax.processing.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
  return load_tokenizer(None)


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
  """(root, files) of a small synthetic set: 6 train scenes, 1 test scene (tests only add files)."""
  root = tmp_path_factory.mktemp("synthetic")
  return root, synthetic.ensure_synthetic_dataset(root, 6, 1, seed=3)
