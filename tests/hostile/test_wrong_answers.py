"""Runs that used to do the wrong thing and exit 0, and the rough edges a new user meets: data files
for a kind that ignores them, an unknown evaluation dataset name, a depth map whose size contradicts
its record, an output folder that cannot be written (found only after the model loaded), damaged
checkpoints when reading a run, sample counts after a resume, library noise."""

import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from depthvlm_jax import evaluate, predict
from depthvlm_jax.evaluation import loading, predictors, runner
from depthvlm_jax.model.config import ConfigError
from depthvlm_jax.runs import checkpoints
from depthvlm_jax.train import config_checks
from tests.evaluation.helpers import write_dataset
from tests.hostile.conftest import ROOT, TRAIN_OVERRIDES, cli_env, error_line, run, train
from tests.hostile.test_checkpoints import damage
from tests.hostile.test_train_cli import config


def call(main, *argv):
  """A CLI's main(argv) in this process: (exit status, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      main([str(a) for a in argv])
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()


@pytest.fixture
def unwritable(tmp_path):
  """A folder path whose parent refuses new files even to root (sysfs), or skip."""
  try:
    (pathlib.Path("/sys") / "depthvlm_write_probe").touch()
  except OSError:
    return pathlib.Path("/sys/depthvlm_out")
  pytest.skip("no unwritable folder on this machine")


def _no_model_load(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the output folder was checked")
  monkeypatch.setattr(loading, "load_model", refuse)


# 1. data.train_files with data.kind left at "synthetic" trained on the synthetic scenes.

def test_train_files_for_the_synthetic_kind_are_a_config_error(tmp_path):
  c = config()
  c.data.train_files = {"mine": f"{tmp_path}/ann.jsonl|{tmp_path}|{tmp_path}"}
  with pytest.raises(ConfigError) as e:
    config_checks.validate_config(c)
  assert "data.train_files" in str(e.value) and "data.kind" in str(e.value)


@pytest.mark.slow
def test_cli_config_with_train_files_but_no_kind_is_refused(tmp_path):
  write_dataset(tmp_path / "mine", 3)
  cfg = tmp_path / "mine.py"
  cfg.write_text("from configs import stage1\n\n\ndef get_config():\n  c = stage1.get_config()\n"
                 f"  c.data.train_files = {{'mine': '{tmp_path}/mine/ann.jsonl|{tmp_path}/mine/rgb|"
                 f"{tmp_path}/mine/depth|nyuv2'}}\n  return c\n")
  proc = run("main.py", f"--config={cfg}", f"--workdir={tmp_path / 'w'}")
  error_line(proc.returncode, proc.stderr, "data.train_files", "data.kind")
  assert not (tmp_path / "w").exists()


# 2. evaluate --data examples=... (not a dataset name) skipped every record and exited 0.

def test_evaluate_refuses_an_unknown_dataset_name_and_lists_the_known(tmp_path):
  ann = write_dataset(tmp_path / "d", 3)
  data = f"{ann}|{tmp_path / 'd/rgb'}|{tmp_path / 'd/depth'}"
  code, _, err = call(evaluate.main, "--baseline", "constant:2", "--data", f"examples={data}", "--out", tmp_path / "o")
  error_line(code, err, "examples", "nyuv2", "scannetpp")
  assert not (tmp_path / "o").exists()
  # with the kind given, records whose coordinate frame is ambiguous are all skipped: a failing status
  code, _, err = call(evaluate.main, "--baseline", "constant:2", "--data", f"examples={data}|nyuv2", "--out",
                      tmp_path / "o", "--workers", 1)
  error_line(code, err, "examples", "bad_coordinates 3")
  code, _, err = call(evaluate.main, "--baseline", "constant:2", "--data", f"examples={data}|nyuv2", "--out",
                      tmp_path / "o2", "--workers", 1, "--coord_frame", "examples=depth")
  assert code == 0, err
  summary = json.loads((tmp_path / "o2" / runner.SUMMARY_FILE).read_text())
  assert summary["datasets"]["examples"]["images"] == 3 and summary["datasets"]["examples"]["skipped"] == {}


# 3. A depth map of another size than its record declares was resized and scored.

def test_depth_map_whose_size_contradicts_its_record_is_a_counted_skip(tmp_path):
  ann = write_dataset(tmp_path / "d", 3, depth_wh=(32, 24))
  Image.fromarray(np.full((50, 100), 2000, np.uint16)).save(tmp_path / "d/depth/1.png")
  ds = runner.EvalDataset("d", str(ann), str(tmp_path / "d/rgb"), str(tmp_path / "d/depth"), "nyuv2", "depth")
  summary = runner.run(predictors.GroundTruth(), [ds], tmp_path / "o", progress=False, workers=1)
  d = summary["datasets"]["d"]
  assert d["skipped"] == {"corrupt_depth": 1}
  assert d["images"] == d["dense"]["images"] == d["sparse"]["images"] == 2
  assert d["dense"]["delta1"] == 1.0  # the ground truth of the two good records scores exactly
  assert any(m.startswith(f"{ann}:2: ") and "100x50" in m for m in d["skip_messages"])


# 4. predict into a read-only folder failed with a traceback after loading the model.

def test_predict_checks_the_output_folder_before_loading(tmp_path, unwritable, monkeypatch):
  _no_model_load(monkeypatch)
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
  code, _, err = call(predict.main, "--model", tmp_path / "no_model", "--image", tmp_path / "x.png",
                      "--out", unwritable)
  error_line(code, err, f"--out={unwritable}")


def test_evaluate_checks_the_output_folder_before_loading(tmp_path, unwritable, monkeypatch):
  _no_model_load(monkeypatch)
  ann = write_dataset(tmp_path / "d", 1)
  code, _, err = call(evaluate.main, "--model", tmp_path / "no_model", "--data",
                      f"d={ann}|{tmp_path / 'd/rgb'}|{tmp_path / 'd/depth'}|nyuv2", "--out", unwritable)
  error_line(code, err, f"--out={unwritable}")


@pytest.mark.slow
def test_export_checks_the_output_folder_before_loading(tmp_path, unwritable):
  proc = run("-m", "depthvlm_jax.export", f"--checkpoint={tmp_path / 'no_model'}", f"--out={unwritable}")
  error_line(proc.returncode, proc.stderr, f"--out={unwritable}")


# 5. Damaged checkpoints when reading a run.

@pytest.mark.slow
def test_reading_a_run_with_a_damaged_newest_step_says_so_in_one_line(run_copy, tmp_path):
  workdir, _ = run_copy
  damage(workdir / "checkpoints" / "2")
  proc = run("-m", "depthvlm_jax.export", f"--checkpoint={workdir}", f"--out={tmp_path / 'hf'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "hf" / "config.json").exists()
  lines = [line for line in proc.stderr.splitlines() if "checkpoint" in line or "step" in line]
  assert len(lines) == 1, proc.stderr[-3000:]  # the notice alone, no library logs around it
  assert "step 2" in lines[0] and "using step 1" in lines[0] and "Traceback" not in proc.stderr


def test_damaged_frozen_params_is_one_error_naming_that_folder(run_copy):
  workdir, _ = run_copy
  damage_frozen(workdir)
  with pytest.raises(checkpoints.FrozenParamsError) as e:
    checkpoints.restore_params(workdir)
  assert str(e.value).startswith(str(workdir / checkpoints.FROZEN_DIR))
  assert str(workdir / "checkpoints") not in str(e.value)


@pytest.mark.slow
def test_cli_reading_a_run_with_damaged_frozen_params_is_one_line(run_copy, tmp_path):
  workdir, _ = run_copy
  damage_frozen(workdir)
  proc = run("-m", "depthvlm_jax.export", f"--checkpoint={workdir}", f"--out={tmp_path / 'hf'}")
  line = error_line(proc.returncode, proc.stderr, str(workdir / checkpoints.FROZEN_DIR))
  assert str(workdir / "checkpoints") not in line
  assert len([x for x in proc.stderr.splitlines() if x.strip()]) == 1, proc.stderr[-3000:]
  assert not (tmp_path / "hf").exists()


def damage_frozen(workdir):
  files = [p for p in (workdir / checkpoints.FROZEN_DIR / "d").iterdir() if p.is_file()]
  assert files
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(10)


# 6. After kill -9 and resume, results.json counted only the samples drawn since the resume.

@pytest.mark.slow
def test_sample_counts_survive_a_resume(run_copy, trained):
  workdir, data = run_copy
  uninterrupted = json.loads((trained[0] / "results.json").read_text())["skipped_by_source"]
  # killed after step 1's checkpoint: step 2 and the results never written
  shutil.rmtree(workdir / "checkpoints" / "2")
  (workdir / "results.json").unlink()
  proc = run("-m", "tests.hostile.stand_in_run", workdir, data)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any("64x96" in line and "compil" in line for line in (proc.stdout + proc.stderr).splitlines())
  resumed = json.loads((workdir / "results.json").read_text())["skipped_by_source"]
  assert resumed == uninterrupted and resumed["synthetic"]["drawn"] == 16  # 2 steps of 8


# 6. Library noise on every run, shown with --verbosity=1; a closing summary a person reads.

@pytest.mark.slow
def test_a_run_prints_no_library_noise_by_default(run_copy):
  workdir, data = run_copy
  env = {k: v for k, v in cli_env().items() if k != "JAX_PLATFORMS"}  # as a user's shell has it
  noise = ("PyTorch was not found", "Metadata file does not exist", "unexpected worker hostname",
           "Failed to find host bounds", "checkpoint_manager.py", "checkpointer.py")

  def main_py(*extra):
    proc = subprocess.run([sys.executable, "main.py", "--config=configs/stage1.py", f"--workdir={workdir}",
                           f"--config.data.synthetic_dir={data}", *TRAIN_OVERRIDES, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  quiet = main_py()  # every step is done: restores step 2, writes the results
  assert not [n for n in noise if n in quiet.stderr], quiet.stderr[-3000:]
  assert f"synthetic scenes in {data}" in quiet.stderr  # the run names the data it trains on
  assert str(workdir / "results.json") in quiet.stdout and "{" not in quiet.stdout
  loud = main_py("--verbosity=1")
  assert [n for n in noise if n in loud.stderr], loud.stderr[-3000:]


# 6. Smaller ones: export file modes, the evaluate table's average row, a workdir of unrelated files.

def test_every_exported_file_is_readable_as_umask_allows(tmp_path):
  from depthvlm_jax import export
  from depthvlm_jax.model.config import Qwen3VLConfig
  from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM
  from tests.evaluation.helpers import random_params
  cfg = Qwen3VLConfig.tiny(tie_word_embeddings=True)
  model = DepthVLM(cfg, head=DepthHeadConfig.tiny())
  umask = os.umask(0o022)
  try:
    out = export.write_hf_dir(random_params(model, seed=1), cfg, model.head, tmp_path / "hf")
  finally:
    os.umask(umask)
  modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
  assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_average_row_counts_images_not_datasets(tmp_path):
  ds = [runner.EvalDataset(n, str(write_dataset(tmp_path / n, k, seed=k)), str(tmp_path / n / "rgb"),
                           str(tmp_path / n / "depth"), "nyuv2", "depth") for n, k in (("a", 3), ("b", 2))]
  summary = runner.run(predictors.ConstantDepth(2.0), ds, tmp_path / "o", progress=False, workers=1)
  assert summary["average"]["dense"]["images"] == 5 and summary["average"]["dense"]["datasets"] == 2
  average_rows = [line.split() for line in summary["table"].splitlines() if line.startswith("average")]
  assert average_rows and all("5" in row for row in average_rows)


@pytest.mark.slow
def test_workdir_of_unrelated_files_is_refused(tmp_path):
  workdir = tmp_path / "photos"
  workdir.mkdir()
  (workdir / "holiday.jpg").write_bytes(b"x")
  proc = train(workdir, tmp_path / "data")
  error_line(proc.returncode, proc.stderr, f"--workdir={workdir}")
  assert sorted(p.name for p in workdir.iterdir()) == ["holiday.jpg"]


@pytest.mark.slow
def test_demo_removes_its_temporary_folder_on_sigterm(tmp_path):
  pytest.importorskip("gradio")
  import signal
  from depthvlm_jax import demo
  from tests.test_demo import _free_port, _wait_for_server
  model, _ = demo.choose_model(None, tmp_path / "m", [str(tmp_path / "no_such_run")])  # the tiny random model
  (tmp_path / "tmp").mkdir()
  env = dict(cli_env(), TMPDIR=str(tmp_path / "tmp"), GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
  port = _free_port()
  log = tmp_path / "server.log"
  with open(log, "w") as f:
    server = subprocess.Popen([sys.executable, "-m", "depthvlm_jax.demo", "--model", str(model), "--port", str(port)],
                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
  try:
    _wait_for_server(f"http://127.0.0.1:{port}", server, log)
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("depthvlm_demo_")]
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
  finally:
    if server.poll() is None:
      server.kill()
  assert not [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("depthvlm_demo_")]
  assert "share=True" not in log.read_text()  # Gradio's hint names an argument a CLI user cannot set
