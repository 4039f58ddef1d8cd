"""Reading a dataset converted by `data_pipelines.tfds_builder`: random access to its examples.

Kept apart from the builder so that the pipeline (`pipeline.load_records` of an `array_record`
source) reads converted data without importing the builder, which itself builds on the pipeline.
"""

from __future__ import annotations

import collections.abc
import pathlib

import numpy as np
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
  return _Decoded(builder, split)


class _Decoded(collections.abc.Sequence):
  """Decodes TFDS text features (bytes) to str so examples match `RGBDRecord` fields."""

  def __init__(self, builder, split: str):
    self._builder, self._split = builder, split
    self._source = builder.as_data_source(split=split)

  def canonical_sizes(self) -> np.ndarray:
    """(N, 2) int32 canonical (h, w) of every example from its `canonical_hw` feature, the image
    and depth left undecoded; (-1, -1) for all when the split was converted without that feature."""
    if "canonical_hw" not in self._builder.info.features:
      return np.full((len(self), 2), -1, np.int32)
    skip = tfds.decode.SkipDecoding()
    sizes = self._builder.as_data_source(split=self._split, decoders={"image": skip, "depth": skip})
    out = np.empty((len(self), 2), np.int32)
    for start in range(0, len(self), 1024):
      chunk = range(start, min(start + 1024, len(self)))
      out[chunk.start:chunk.stop] = [ex["canonical_hw"] for ex in sizes.__getitems__(chunk)]
    return out

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    ex = dict(self._source[int(index)])
    for k in ("prompt", "solution", "key", "dataset"):
      if isinstance(ex[k], bytes):
        ex[k] = ex[k].decode("utf-8")
    return ex
