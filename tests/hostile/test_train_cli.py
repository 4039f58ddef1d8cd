"""`main.py` as a careless user drives it: bad values, bad overrides, a changed config on resume, two
runs in one workdir, a damaged config.json. Each is refused before any work with one line naming
the field, flag or file, and leaves the workdir as it was."""

import json
import os
import socket

import ml_collections
import pytest

from configs import stage1
from depthvlm_jax.model.config import ConfigError
from depthvlm_jax.train import config_checks, run_record, trainer, workdir_lock
from tests.hostile.conftest import error_line, run, train


def config(**changes):
  c = ml_collections.ConfigDict(stage1.get_config().to_dict())
  c.update_from_flattened_dict(changes)  # dotted names, as on the command line
  return c


@pytest.mark.parametrize("field,value,expected", [
    ("train.lr", -1.0, "train.lr=-1.0: expected a positive learning rate"),
    ("train.lr", 0.0, "train.lr=0.0: expected a positive learning rate"),
    ("train.total_steps", -5, "train.total_steps=-5: expected >= 0"),
    ("train.global_batch", 0, "train.global_batch=0: expected a positive integer"),
    ("train.micro_batches", 0, "train.micro_batches=0: expected a positive integer"),  # was ZeroDivisionError
    ("ckpt_every", 0, "ckpt_every=0: expected a positive integer"),
    ("log_every", -1, "log_every=-1: expected a positive integer"),
    ("data.buckets", ((96, 100),), "data.buckets entry (96, 100): expected (H, W), both positive multiples of 32"),
    ("data.buckets", ((96, 128), (96, 128)), "a bucket is listed twice"),
    ("data.max_skip_rate", 0.0, "data.max_skip_rate=0.0: expected 0 < rate <= 1"),
    ("data.train_weights", {"waymo": 2.0}, "data.train_weights.waymo: no such train source; expected one of "
                                           "['synthetic']"),
    ("model.attention_impl", "flash", "model.attention_impl='flash': expected one of ('auto', 'xla', 'splash', 'cudnn')"),
    ("train.lora_rank", -4, "train.lora_rank=-4: expected an integer >= 0 (0 = full fine-tuning)"),
])
def test_bad_training_values_are_config_errors(field, value, expected):
  with pytest.raises(ConfigError, match="invalid config") as e:
    config_checks.validate_config(config(**{field: value}))
  assert expected in str(e.value)


@pytest.mark.parametrize("changes,expected", [
    ({"train.lora_alpha": 0.0}, "train.lora_alpha=0.0: expected a positive number"),
    ({"train.lora_targets": "language_model/(q_proj"}, "train.lora_targets='language_model/(q_proj': not a "
                                                       "regular expression (missing ), unterminated subpattern"),
    # module paths are matched in full: a bare layer name matches nothing
    ({"train.lora_targets": "q_proj"}, "train.lora_targets='q_proj' matches no linear layer's module path (e.g. "
                                       "language_model/layers_0/mlp/down_proj, "),
    ({"train.lora_rank": 64}, "train.lora_rank=64 is not below both dimensions of language_model/layers_0/mlp/"
                              "down_proj (128, 64): expected a lower rank"),
    ({"train.lora_targets": r"language_model/layers_[01]/mlp/up_proj", "model.scan_layers": True},
     "adapts the repeated blocks unevenly (e.g. ['language_model/layers_2', 'language_model/layers_3']); "
     "with model.scan_layers=True every layer needs the same adapters"),
])
def test_bad_lora_settings_are_config_errors(changes, expected):
  """With a rank > 0 the targets are checked against the model's own linear layers (shapes traced, no weights)."""
  with pytest.raises(ConfigError, match="invalid config") as e:
    config_checks.validate_config(config(**{"train.lora_rank": 8, **changes}))
  assert expected in str(e.value)


def test_missing_train_files_are_config_errors(tmp_path):
  c = config(**{"data.kind": "jsonl"})
  c.data.train_files = {"mine": f"{tmp_path}/nope.jsonl|{tmp_path}/images|{tmp_path}"}
  with pytest.raises(ConfigError) as e:
    config_checks.validate_config(c)
  assert f"data.train_files.mine: annotation file '{tmp_path}/nope.jsonl' not found" in str(e.value)
  assert f"data.train_files.mine: image_root '{tmp_path}/images' is not a directory" in str(e.value)


def test_mesh_is_checked_before_the_workdir_is_touched(tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(ConfigError, match=r"mesh=\{'data': 3.*needs 3 devices"):
    trainer.train_and_evaluate(config(**{"mesh.data": 3, "mesh.fsdp": 1}), str(workdir))
  assert not workdir.exists()


def test_attention_kernel_of_another_platform_is_refused_before_the_workdir_is_touched(tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(ConfigError, match="model.attention_impl='splash' compiles for tpu only, the target is cpu"):
    trainer.train_and_evaluate(config(**{"model.attention_impl": "splash"}), str(workdir))
  assert not workdir.exists()


@pytest.mark.slow
def test_cli_config_error_is_one_line_without_traceback(tmp_path):
  proc = run("main.py", f"--workdir={tmp_path / 'w'}", "--config.train.lr=-1", "--config.train.micro_batches=0")
  error_line(proc.returncode, proc.stderr, "train.lr=-1.0", "train.micro_batches=0")
  assert not (tmp_path / "w").exists()  # nothing written


@pytest.mark.slow
def test_cli_unknown_override_names_the_flag(tmp_path):
  proc = run("main.py", f"--workdir={tmp_path / 'w'}", "--config.data.train_files.mydata=a.jsonl|img|depth")
  line = error_line(proc.returncode, proc.stderr, "--config.data.train_files.mydata", "config file")
  assert "c.data.train_files" in line  # says how to give named files instead


@pytest.mark.slow
def test_cli_missing_config_file_names_it(tmp_path):
  proc = run("main.py", f"--workdir={tmp_path / 'w'}", "--config=configs/nope.py")
  error_line(proc.returncode, proc.stderr, "--config=configs/nope.py", "No such file")


@pytest.mark.slow
def test_resume_with_changed_model_is_refused_with_the_diff(run_copy):
  workdir, data = run_copy
  before = (workdir / "config.json").read_text()
  proc = train(workdir, data, "--config.model.dpt_features=32", "--config.train.total_steps=4")
  error_line(proc.returncode, proc.stderr, str(workdir / "config.json"), "model.dpt_features: 16 -> 32")
  assert "total_steps" not in proc.stderr  # allowed changes are not listed as the reason
  assert (workdir / "config.json").read_text() == before  # the run's record is untouched
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]


@pytest.mark.slow
def test_invalid_workdir_config_json_is_named(run_copy):
  workdir, data = run_copy
  (workdir / "config.json").write_text("{not json")
  proc = train(workdir, data)
  error_line(proc.returncode, proc.stderr, str(workdir / "config.json"), "not valid JSON")


@pytest.mark.slow
def test_second_run_in_a_locked_workdir_is_refused_naming_the_holder(run_copy):
  workdir, data = run_copy
  with workdir_lock.hold(workdir):  # this test process plays the running trainer
    proc = train(workdir, data, "--config.train.total_steps=3")
    error_line(proc.returncode, proc.stderr, f"pid {os.getpid()}", socket.gethostname(), "in use")
    assert workdir_lock.read_lease(workdir)["pid"] == os.getpid()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  assert not (workdir / workdir_lock.LEASE_NAME).exists()  # released


def test_lock_is_free_again_after_the_holder_ends(tmp_path):
  with workdir_lock.hold(tmp_path):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
      with workdir_lock.hold(tmp_path):
        pass
  with workdir_lock.hold(tmp_path):  # taken again once released
    pass


def test_results_json_is_strict_json_with_nonfinite_values_flagged(tmp_path):
  run_record.write_results(tmp_path / "results.json", {"synthetic_test": {"delta1": float("nan"), "images": 2},
                                                    "loss": [1.0, float("inf")]})
  text = (tmp_path / "results.json").read_text()
  got = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in results.json"))
  assert got["synthetic_test"]["delta1"] is None and got["loss"] == [1.0, None]
  assert got["nonfinite"] == ["synthetic_test.delta1", "loss[1]"]
