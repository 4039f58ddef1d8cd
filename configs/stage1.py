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
    # 640 steps over the 512 synthetic scenes: about 12.5 min on an idle 2-core CPU (held-out δ1
    # 0.41 / 0.45 / 0.48 / 0.46 at steps 160 / 320 / 480 / 640; 3 epochs reached 0.40).
    c.train.epochs = 10.0
    c.eval_every = 160
  return c.lock()
