"""Stage 1: train the depth head only (vision tower, LLM and LM head frozen) with the depth loss."""

from configs import common

COMMON = {
    "train.trainable": [("depth_head/.*", True), (".*", False)],
    "train.warmup_fraction": 0.04,
    "data.qa_weight": 0.0,
}

_PAPER = {"train.lr": 3.5e-4, "train.global_batch": 2560, "train.micro_batches": 8}
PER_PRESET = {
    # 1280 steps (20 epochs over the 512 synthetic scenes): about 7 min on this 2-core CPU.
    # Held-out δ1 0.52 / 0.49 / 0.71 / 0.73 at steps 320 / 640 / 960 / 1280 against 0.37 for the
    # best constant depth; 640 steps reached 0.69.
    "default": {"train.lr": 2e-3, "train.global_batch": 8, "train.epochs": 20.0, "eval_every": 320},
    "paper_4b": _PAPER,
    "paper_8b": _PAPER,
}


def get_config(arg=None):
  return common.make_config(arg, 1, COMMON, PER_PRESET)
