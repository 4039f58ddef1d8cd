"""Stage 1: train the depth head only (vision tower, LLM and LM head frozen) with the depth loss."""

from configs import common


def get_config(arg=None):
  preset = common.parse_preset(arg)
  c = common.base_config(preset)
  c.stage = 1
  c.train.trainable = [("depth_head/.*", True), (".*", False)]
  c.train.lr = 3.5e-4 if preset != "default" else 2e-3
  c.train.warmup_fraction = 0.04
  c.data.qa_weight = 0.0
  if preset != "default":
    c.train.global_batch = 2560
    c.train.micro_batches = 8
  else:
    c.train.global_batch = 8
    c.train.epochs = 3.0  # 192 steps over the 512 synthetic scenes
    c.eval_every = 64
  return c.lock()
