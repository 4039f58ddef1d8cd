"""Reading a dataset converted by `data_pipelines.tfds_builder`: random access to its examples.

Kept apart from the builder so that the pipeline (`pipeline.load_records` of an `array_record`
source) reads converted data without importing the builder, which itself builds on the pipeline.
"""

from __future__ import annotations

import collections.abc
import pathlib

import tensorflow_datasets as tfds
from etils import epath


def data_source(directory: str | pathlib.Path, split: str):
  """Random-access source (len, [i] -> example dict of NumPy arrays / str) of one converted split."""
  directory = epath.Path(directory)
  if not (directory / "dataset_info.json").exists():
    raise FileNotFoundError(f"{directory}: no dataset_info.json; expected a directory written by "
                            f"data_pipelines.tfds_builder.convert")
  builder = tfds.builder_from_directory(str(directory))
  if split not in builder.info.splits:
    raise ValueError(f"{directory}: no split {split!r}; it has {sorted(builder.info.splits)}")
  return _Decoded(builder.as_data_source(split=split))


class _Decoded(collections.abc.Sequence):
  """Decodes TFDS text features (bytes) to str so examples match `RGBDRecord` fields."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    ex = dict(self._source[int(index)])
    for k in ("prompt", "solution", "key", "dataset"):
      if isinstance(ex[k], bytes):
        ex[k] = ex[k].decode("utf-8")
    return ex
