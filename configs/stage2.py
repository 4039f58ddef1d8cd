"""Stage 2: from the stage-1 run, train LLM + LM head + depth head (vision frozen) with depth + LM loss.

`python main.py --config=configs/stage2.py[:PRESET]`, PRESET one of default | paper_4b | paper_8b.
The default preset starts from `runs/stage1_default`; set `--config.model_init=DIR` for a stage-1
run elsewhere. The settings and what each preset changes are in `depthvlm_jax/presets.py`.
"""

from depthvlm_jax import presets


def get_config(arg=None):
  return presets.get_config(2, arg)
