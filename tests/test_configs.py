"""Config values per stage and preset are pinned: `tests/config_values.json` holds every field of
`get_config(preset).to_dict()` for both stages, as main wrote them before the presets became override blocks (regenerate from main when a value changes on purpose).
The only intended difference: the default stage-2 run starts from `runs/stage1_default` (the default
workdir of stage 1) instead of a /tmp path."""

import json
import pathlib

import pytest
from flax.traverse_util import flatten_dict

from configs import stage1, stage2
from depthvlm_jax import presets

EXPECTED = json.loads((pathlib.Path(__file__).parent / "config_values.json").read_text())
MOVED = {("stage2:default", "model_init"): "runs/stage1_default",
         ("stage2:default", "data.synthetic_dir"): "runs/stage1_default/synthetic_data"}


def _flat(d):
  return flatten_dict(d, keep_empty_nodes=True, sep=".")


@pytest.mark.parametrize("stage,module", [("stage1", stage1), ("stage2", stage2)])
@pytest.mark.parametrize("preset", list(presets.PRESETS))
def test_values_unchanged(stage, module, preset):
  name = f"{stage}:{preset}"
  got = _flat(json.loads(json.dumps(module.get_config(preset).to_dict())))
  want = _flat(EXPECTED[name])
  for (which, field), value in MOVED.items():
    if which == name:
      assert got[field] == value
      want[field] = value
  assert got == want


def test_presets_and_errors():
  assert set(presets.PRESETS) == {"default", "paper_4b", "paper_8b"}
  assert stage1.get_config().preset == "default" and stage2.get_config().stage == 2
  with pytest.raises(ValueError, match="unknown config preset 'big'"):
    stage1.get_config("big")
  with pytest.raises(KeyError, match="lrr"):  # a block naming a field that does not exist
    stage1.get_config().update_from_flattened_dict({"train.lrr": 1.0})
  with pytest.raises(ValueError, match="unknown stage 3"):
    presets.get_config(3)
  assert presets.get_config(2, "paper_4b").to_dict() == stage2.get_config("paper_4b").to_dict()
  assert presets.default_workdir(2, "paper_4b") == "runs/stage2_paper_4b"


def test_no_tmp_paths_in_configs():
  root = pathlib.Path(__file__).resolve().parents[1] / "configs"
  assert not [p.name for p in root.glob("*.py") if "/tmp" in p.read_text()]
