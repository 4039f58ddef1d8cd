"""`evaluate` and `predict` on a training workdir whose config.json was damaged: one line naming the
file (it used to be a JSONDecodeError traceback)."""

import pytest
import numpy as np
from PIL import Image

from tests.hostile.conftest import error_line, run
from tests.hostile.test_predict_cli import call


@pytest.mark.slow
def test_evaluate_names_the_invalid_workdir_config(run_copy, tmp_path):
  workdir, data = run_copy
  (workdir / "config.json").write_text('{"model": ')
  proc = run("-m", "depthvlm_jax.evaluate", f"--model={workdir}",
             f"--data=syn={data}/test.jsonl|{data}|{data}|synthetic", f"--out={tmp_path / 'eval'}")
  error_line(proc.returncode, proc.stderr, str(workdir / "config.json"), "not a valid training config")


def test_predict_names_the_invalid_workdir_config(run_copy, tmp_path):
  workdir, _ = run_copy
  (workdir / "config.json").write_text("[]")
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
  code, err = call("--model", workdir, "--image", tmp_path / "x.png", "--out", tmp_path / "o")
  error_line(code, err, str(workdir / "config.json"))
