"""Stage 2: from the stage-1 checkpoint, train LLM + LM head + depth head (vision frozen) on RGB-D with
text replies mixed with caption/QA samples; depth + LM loss."""

from configs import common


def get_config(arg=None):
  preset = common.parse_preset(arg)
  c = common.base_config(preset)
  c.stage = 2
  c.train.trainable = [("visual/.*", False), ("(language_model|lm_head)/.*", True),
                       ("depth_head/.*", True)]
  c.train.lr = 2e-5 if preset != "default" else 5e-4
  c.train.warmup_fraction = 0.05
  c.data.qa_weight = 0.5
  c.model_init = "/tmp/depthvlm_stage1" if preset == "default" else ""
  if preset != "default":
    c.train.global_batch = 640
    c.train.micro_batches = 4
  else:
    c.train.global_batch = 8
    c.train.epochs = 2.0
  return c.lock()
