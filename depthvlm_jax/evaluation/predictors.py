"""What the evaluation loop asks for depth: the DepthVLM model (batched, jitted, sharded) or a baseline.

A predictor has `description` (recorded with the results), `bucket(item, conv)` (items of one bucket
are batched together) and `__call__(items, conv)` -> one depth map per item at the processed size.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

import numpy as np

from data_pipelines import rgbd
from depthvlm_jax.evaluation import protocol
from depthvlm_jax.evaluation.runner import EvalConfigError, EvalDataset, Item, parse_dataset, planned_canonical_hw
from depthvlm_jax.processing.chat import DEFAULT_PROMPT
from depthvlm_jax.processing.image_processor import ImageProcessorConfig, processed_size


def _default_processed_hw(item: Item, conv: protocol.Conventions) -> tuple[int, int]:
  """The size a default Qwen3-VL processor feeds the model for this item's canonical image."""
  return processed_size(*planned_canonical_hw(item), ImageProcessorConfig(), conv.preprocessing)


class ConstantDepth:
  """Baseline: the same depth (metres) everywhere, at the size a model would predict."""

  def __init__(self, value: float, label: str | None = None):
    if not (value > 0 and math.isfinite(value)):
      raise EvalConfigError(f"constant depth must be a positive number of metres, got {value!r}")
    self.value = float(value)
    self.description = label or f"constant:{self.value:g}"

  def bucket(self, item: Item, conv: protocol.Conventions):
    return 0

  def __call__(self, items: Sequence[Item], conv: protocol.Conventions) -> list[np.ndarray]:
    return [np.full(_default_processed_hw(it, conv), self.value, np.float32) for it in items]


class GroundTruth:
  """Baseline: the canonical GT map itself as the prediction (checks the protocol; δ1 must be 1)."""

  description = "ground_truth"

  def bucket(self, item: Item, conv: protocol.Conventions):
    return 0

  def __call__(self, items: Sequence[Item], conv: protocol.Conventions) -> list[np.ndarray]:
    return [it.sample.depth.copy() for it in items]


def system_turn_ids(tokenizer, system_prompt: str | None) -> list[int]:
  """Token ids of a `<|im_start|>system ... <|im_end|>` turn (the chat template's system turn), or []."""
  if not system_prompt:
    return []
  return list(tokenizer(f"<|im_start|>system\n{system_prompt}<|im_end|>\n", add_special_tokens=False).input_ids)


class ModelPredictor:
  """DepthVLM depth maps at the processed resolution, batched, jitted and sharded over the mesh.

  Images are resized to the processed size of their canonical size (`processed_size`: multiples of
  32, directly or after the official 28-multiple step); each processed size is one static bucket
  (`depth_grid`), the token sequence is padded to a multiple of `seq_multiple`, and the batch to
  `batch_size` (a multiple of the mesh's data axes).
  """

  def __init__(self, loaded, batch_size: int = 8, mesh=None, seq_multiple: int = 64):
    import jax
    from depthvlm_jax import sharding
    self.loaded, self.mesh, self.seq_multiple = loaded, mesh, seq_multiple
    data_ways = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch_size = -(-batch_size // data_ways) * data_ways
    self.description = f"model:{loaded.path}"
    model = loaded.model
    self._sharding = sharding
    fwd = lambda params, batch, grid: model.apply({"params": params}, batch["input_ids"], batch["position_ids"],
                                                  batch["attention_mask"], batch["pixel_values"],
                                                  batch["image_grid_hw"], compute_logits=False, depth_grid=grid).depth
    # traced under the mesh: the attention kernel follows its platform and is laid out over it
    self._fwd = jax.jit(fwd if mesh is None else sharding.in_mesh(fwd, mesh), static_argnums=2)

  def processed_hw(self, canonical_hw: tuple[int, int], preprocessing: str = "direct") -> tuple[int, int]:
    return processed_size(canonical_hw[0], canonical_hw[1], self.loaded.processor, preprocessing)

  def bucket(self, item: Item, conv: protocol.Conventions):
    return self.processed_hw(planned_canonical_hw(item), conv.preprocessing)

  def depth_at_processed(self, images: Sequence[np.ndarray], prompts: Sequence[str], preprocessing: str = "direct",
                         system_prompt: str | None = None) -> np.ndarray:
    """(Hc, Wc, 3) uint8 canonical images of one processed size -> (n, Hp, Wp) depth there."""
    import jax
    from depthvlm_jax.model.inputs import make_model_inputs
    from depthvlm_jax.processing import chat
    from depthvlm_jax.processing.image_processor import preprocess_image
    model, proc, tok = self.loaded.model, self.loaded.processor, self.loaded.tokenizer
    hp, wp = self.processed_hw(images[0].shape[:2], preprocessing)
    merge_px = proc.factor
    n_tokens = (hp // merge_px) * (wp // merge_px)
    patches, grid = zip(*(preprocess_image(im, proc, size=(hp, wp), preprocessing=preprocessing) for im in images))
    system = system_turn_ids(tok, system_prompt)
    ids = [np.asarray(system + list(chat.encode_sample(tok, p, [n_tokens])["input_ids"]), np.int32) for p in prompts]
    seq_len = -(-max(len(i) for i in ids) // self.seq_multiple) * self.seq_multiple
    n = len(images)
    pad = self.batch_size - n
    ids, patches = list(ids) + [ids[-1]] * pad, list(patches) + [patches[-1]] * pad
    grids = [g[1:] for g in grid] + [grid[-1][1:]] * pad
    batch = make_model_inputs(ids, model.config, patches, grids, padding_side="right", seq_len=seq_len,
                              pad_id=tok.pad_token_id)
    batch.pop("rope_deltas")
    if self.mesh is not None:
      names = {"position_ids": (None, "batch"), "pixel_values": ("images",), "image_grid_hw": ("images",)}
      batch = {k: jax.device_put(v, self._sharding.activation_sharding(self.mesh, *names.get(k, ("batch",)),
                                                                        shape=v.shape))
               for k, v in batch.items()}
    depth = self._fwd(self.loaded.params, batch, (hp // merge_px, wp // merge_px))
    return np.asarray(depth, np.float32)[:n]

  def __call__(self, items: Sequence[Item], conv: protocol.Conventions) -> list[np.ndarray]:
    out: list[np.ndarray | None] = [None] * len(items)
    groups = collections.defaultdict(list)
    for i, it in enumerate(items):
      groups[self.processed_hw(it.sample.image.shape[:2], conv.preprocessing)].append(i)
    for idx in groups.values():
      for s in range(0, len(idx), self.batch_size):
        part = idx[s:s + self.batch_size]
        maps = self.depth_at_processed([items[i].sample.image for i in part],
                                       [items[i].record.prompt or DEFAULT_PROMPT for i in part],
                                       conv.preprocessing, conv.system_prompt)
        for i, m in zip(part, maps):
          out[i] = m
    return out


def train_median_depth(dataset: EvalDataset, bins_per_octave: int = 2048, limit: int | None = None) -> float:
  """Median of every valid canonical GT pixel of a (train) annotation file.

  Pixels are pooled in a log2 histogram (0.001-4096 m, `bins_per_octave` bins per doubling: relative
  resolution 0.03%), so memory stays constant; the result is the centre of the median bin.
  """
  records, _ = rgbd.read_jsonl(dataset.jsonl)
  lo, octaves = -10.0, 22
  edges = np.linspace(lo, lo + octaves, octaves * bins_per_octave + 1)
  hist = np.zeros(len(edges) - 1, np.int64)
  for r in records[:limit]:
    try:
      s = rgbd.load_sample(r, dataset.image_root, dataset.depth_root, dataset.dataset_kind)
    except rgbd.SampleError:
      continue
    hist += np.histogram(np.log2(s.depth[s.depth > 0]), edges)[0]
  if hist.sum() == 0:
    raise EvalConfigError(f"{dataset.jsonl}: no valid depth pixel to take a median of")
  i = int(np.searchsorted(np.cumsum(hist), (hist.sum() + 1) / 2))
  return float(2 ** ((edges[i] + edges[i + 1]) / 2))


def make_baseline(spec: str):
  """"ground_truth" | "constant:2" | "constant:train_median:JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]"."""
  if spec == "ground_truth":
    return GroundTruth()
  if spec.startswith("constant:train_median:"):
    ds = parse_dataset("train=" + spec[len("constant:train_median:"):])
    value = train_median_depth(ds)
    return ConstantDepth(value, f"constant:train_median={value:.4f}")
  if spec.startswith("constant:"):
    try:
      return ConstantDepth(float(spec[len("constant:"):]))
    except ValueError:
      pass
  raise EvalConfigError(f"--baseline {spec!r}: expected ground_truth, constant:METRES or "
                        "constant:train_median:JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND]")
