"""`export` never destroys folders: a training workdir, its parent and a folder of unrelated files
are refused (the last one replaced only with --overwrite); an earlier export is replaced; a failed
export names --out, not its temporary folder."""

import os

import numpy as np
import pytest
import safetensors.numpy

from depthvlm_jax import export
from depthvlm_jax.model import hf_checkpoint
from tests.hostile.conftest import error_line, run


def tree(path):
  return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.slow
def test_cli_refuses_the_training_workdir_and_its_parent(trained):
  workdir, _ = trained
  before = tree(workdir)
  for out in (workdir, workdir.parent):
    proc = run("-m", "depthvlm_jax.export", f"--checkpoint={workdir}", f"--out={out}", "--overwrite")
    error_line(proc.returncode, proc.stderr, f"--out={out}")
  assert tree(workdir) == before


def test_workdir_elsewhere_is_refused_even_with_overwrite(trained, tmp_path):
  workdir, _ = trained
  with pytest.raises(export.ExportError, match="is a training workdir"):
    export.check_out_dir(workdir, overwrite=True)
  (tmp_path / "projects" / "run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "projects" / "notes.txt").write_text("mine")
  with pytest.raises(export.ExportError, match="holds a training workdir"):
    export.check_out_dir(tmp_path / "projects", overwrite=True)


def test_folder_of_other_files_needs_overwrite(tmp_path):
  out = tmp_path / "docs"
  out.mkdir()
  (out / "thesis.tex").write_text("precious")
  with pytest.raises(export.ExportError, match="not an earlier export.*--overwrite"):
    export.check_out_dir(out)
  assert (out / "thesis.tex").read_text() == "precious"
  assert export.check_out_dir(out, overwrite=True) == out.resolve()


def test_current_and_home_directories_are_refused(tmp_path, monkeypatch):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "f").write_text("x")
  monkeypatch.chdir(tmp_path / "a")
  with pytest.raises(export.ExportError, match="current directory"):
    export.check_out_dir(tmp_path, overwrite=True)
  with pytest.raises(export.ExportError, match="home directory"):
    export.check_out_dir(os.path.expanduser("~"), overwrite=True)


def small_model():
  from depthvlm_jax.model.config import Qwen3VLConfig
  from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM
  from tests.evaluation.helpers import random_params
  config = Qwen3VLConfig.tiny(tie_word_embeddings=True)
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  return model, random_params(model, seed=1)


def test_earlier_export_is_replaced_and_other_folders_are_kept(tmp_path):
  model, params = small_model()
  out = export.write_hf_dir(params, model.config, model.head, tmp_path / "hf", processing_files=False)
  assert (out / export.EXPORT_MARKER).is_file()
  (out / "stale.txt").write_text("from an older export")
  export.write_hf_dir(params, model.config, model.head, out, processing_files=False)  # no --overwrite needed
  assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
  assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folders left beside it


def test_failed_export_names_out_not_its_temporary_folder(tmp_path, monkeypatch):
  model, params = small_model()
  def disk_full(tensors, filename, metadata=None):
    raise OSError(28, "No space left on device", filename)
  monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
  out = tmp_path / "hf"
  with pytest.raises(export.ExportError) as e:
    export.write_hf_dir(params, model.config, model.head, out, processing_files=False)
  assert f"--out={out}" in str(e.value) and "No space left on device" in str(e.value)
  assert ".hf." not in str(e.value)  # the temporary folder's name
  assert list(tmp_path.iterdir()) == []  # and it is gone


@pytest.mark.slow
def test_cli_bad_checkpoint_is_one_line(tmp_path):
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "config.json").write_text("{broken")
  proc = run("-m", "depthvlm_jax.export", f"--checkpoint={tmp_path / 'm'}", f"--out={tmp_path / 'o'}")
  error_line(proc.returncode, proc.stderr, str(tmp_path / "m" / "config.json"))


def test_pickle_refusal_does_not_ask_for_a_cli_option(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
  with pytest.raises(hf_checkpoint.CheckpointError) as e:
    hf_checkpoint.weight_files(tmp_path)
  message = str(e.value)
  assert "safetensors" in message and "pass allow_pickle" not in message
