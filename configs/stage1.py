"""Stage 1: train the depth head only (vision tower, LLM and LM head frozen) with the depth loss.

`python main.py --config=configs/stage1.py[:PRESET]`, PRESET one of default | paper_4b | paper_8b.
The settings and what each preset changes are in `depthvlm_jax/presets.py`; copy this file to build
a config of your own (`c = presets.get_config(1, "paper_4b")`, then set fields of `c`).
"""

from depthvlm_jax import presets


def get_config(arg=None):
  return presets.get_config(1, arg)
