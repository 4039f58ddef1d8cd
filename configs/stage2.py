"""Stage 2: from the stage-1 checkpoint, train LLM + LM head + depth head (vision frozen) on RGB-D with
text replies mixed with caption/QA samples; depth + LM loss."""

from configs import common


def get_config(arg=None):
  preset = common.parse_preset(arg)
  c = common.base_config(preset)
  c.stage = 2
  c.train.trainable = [("visual/.*", False), ("(language_model|lm_head)/.*", True),
                       ("depth_head/.*", True)]
  c.train.lr = 2e-5 if preset != "default" else 2e-3  # the tiny LLM starts from random init
  c.train.warmup_fraction = 0.05
  c.data.qa_weight = 0.5
  c.model_init = "/tmp/depthvlm_stage1" if preset == "default" else ""
  if preset == "default":  # the same synthetic set (and held-out split) as stage 1, not a second copy
    c.data.synthetic_dir = "/tmp/depthvlm_stage1/synthetic_data"
  if preset != "default":
    c.train.global_batch = 640
    c.train.micro_batches = 5  # 128 rows per micro-batch: 2 per chip on a 64-chip slice
  else:
    c.train.global_batch = 8
    # 640 steps, half of each batch caption/QA samples: about 12 min on this 2-core CPU. At 128
    # steps the replies had the template but no number yet ("About "); at 640 every held-out
    # distance answer carries one.
    c.train.epochs = 10.0
    c.eval_every = 160
  return c.lock()
