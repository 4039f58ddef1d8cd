"""Model directories named by hub id (`org/name[@revision]`), read from a hub cache built here.

No test reaches the network: every cache is written in the test in the hub's layout
(`models--ORG--NAME/refs/<branch>` holding a commit hash, `snapshots/<hash>/<files>`) and the hub is
switched off (`HF_HUB_OFFLINE=1`, or its constant in this process).
"""

import os
import pathlib
import shutil
import subprocess
import sys

from huggingface_hub import constants as hub_constants
import numpy as np
import pytest
from PIL import Image

from depthvlm_jax import export, presets
from depthvlm_jax.model import hub
from depthvlm_jax.model.config import ConfigError, Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, random_params
from depthvlm_jax.model.hf_checkpoint import read_config_dict
from depthvlm_jax.runs import model_from_config
from depthvlm_jax.train.config_checks import validate_config

REPO = pathlib.Path(__file__).resolve().parents[1]
MAIN = "a" * 40
V1 = "b" * 40


def cache_model(cache: pathlib.Path, repo_id: str, src: pathlib.Path, commit: str, ref: str | None = "main"):
  """Puts the files of `src` into `cache` as snapshot `commit` of `repo_id` (and `ref` -> commit)."""
  folder = cache / ("models--" + repo_id.replace("/", "--"))
  shutil.copytree(src, folder / "snapshots" / commit)
  if ref:
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
  return folder / "snapshots" / commit


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(tiny exported DepthVLM folder, its parameters)."""
  config = Qwen3VLConfig.tiny(tie_word_embeddings=True)
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  params = random_params(model, seed=1)
  return pathlib.Path(export.write_hf_dir(params, config, model.head, tmp_path_factory.mktemp("m") / "hf")), params


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  """An empty hub cache for this process, with the hub switched off."""
  cache = tmp_path / "hub_cache"
  cache.mkdir()
  monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
  return cache


@pytest.mark.parametrize("value,want", [
    ("JonnyYu828/DepthVLM-4B", ("JonnyYu828/DepthVLM-4B", None)),
    ("Qwen/Qwen3-VL-4B-Instruct@main", ("Qwen/Qwen3-VL-4B-Instruct", "main")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    (f"org/my_model.v2@{V1}", ("org/my_model.v2", V1)),
    ("name", None), ("/abs/org/name", None), ("./org/name", None), ("a/b/c", None), ("../name", None),
    ("org/name@", None), ("org/..", None), ("", None),
])
def test_parse_hub_id(value, want):
  assert hub.parse_hub_id(value) == want


def test_local_path_wins_and_other_values_pass_through(tmp_path, monkeypatch, offline_cache):
  (tmp_path / "src").mkdir()
  cache_model(offline_cache, "org/name", tmp_path / "src", MAIN)  # an id with a cached snapshot ...
  (tmp_path / "org" / "name").mkdir(parents=True)  # ... and a local folder spelled the same
  monkeypatch.chdir(tmp_path)
  assert hub.resolve_model_dir("org/name") == "org/name"
  assert hub.resolve_model_dir(pathlib.Path("org/name")) == "org/name"
  for value in ("", "no_such_dir", "/no/such/dir", "a/b/c"):  # not ids: the caller reports them
    assert hub.resolve_model_dir(value) == value


def test_branch_tag_and_commit_resolve_from_the_cache(tmp_path, offline_cache):
  (tmp_path / "main").mkdir()
  (tmp_path / "main" / "config.json").write_text('{"which": "main"}')
  (tmp_path / "v1").mkdir()
  (tmp_path / "v1" / "config.json").write_text('{"which": "v1"}')
  main = cache_model(offline_cache, "JonnyYu828/DepthVLM-4B", tmp_path / "main", MAIN)
  v1 = cache_model(offline_cache, "JonnyYu828/DepthVLM-4B", tmp_path / "v1", V1, ref="v1")
  assert pathlib.Path(hub.resolve_model_dir("JonnyYu828/DepthVLM-4B")) == main
  assert pathlib.Path(hub.resolve_model_dir("JonnyYu828/DepthVLM-4B@main")) == main
  assert pathlib.Path(hub.resolve_model_dir("JonnyYu828/DepthVLM-4B@v1")) == v1
  assert pathlib.Path(hub.resolve_model_dir(f"JonnyYu828/DepthVLM-4B@{V1}")) == v1


def test_unknown_id_offline_is_one_line_naming_the_id_and_offline_mode(offline_cache):
  for value in ("nobody/no-such-model", "nobody/no-such-model@v9"):
    with pytest.raises(hub.HubError) as e:
      hub.resolve_model_dir(value)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{value}: ")
    assert "HF_HUB_OFFLINE" in message and str(offline_cache) in message


def test_training_config_reads_a_hub_id(exported, offline_cache):
  hf_dir, _ = exported
  cache_model(offline_cache, "org/tiny-depthvlm", hf_dir, MAIN)
  config = presets.get_config(1, "default")
  config.model.hf_dir = "org/tiny-depthvlm"
  validate_config(config)  # the id resolves, and its snapshot has a config.json
  model = model_from_config.build_model(config)
  assert model.config.text == Qwen3VLConfig.from_hf_dict(read_config_dict(hf_dir)).text
  config.model.hf_dir = "org/not-cached"
  with pytest.raises(ConfigError, match=r"model\.hf_dir=org/not-cached: .*HF_HUB_OFFLINE"):
    validate_config(config)


@pytest.mark.slow
def test_training_starts_from_the_backbone_of_a_hub_id(exported, offline_cache):
  import jax
  from depthvlm_jax import sharding
  from depthvlm_jax.train.model_state import initial_params
  hf_dir, params = exported
  cache_model(offline_cache, "org/tiny-depthvlm", hf_dir, MAIN)
  config = presets.get_config(1, "default")
  config.model.hf_dir = "org/tiny-depthvlm"
  config.model.frozen_dtype = config.model.param_dtype = "float32"
  model = model_from_config.build_model(config)
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  like, _ = model_from_config.params_like(config, model, mesh)
  loaded = initial_params(config, model, like, jax.random.key(0))
  flat_loaded = dict(jax.tree_util.tree_leaves_with_path(loaded))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(params))
  backbone = [k for k in flat_want if "depth_head" not in jax.tree_util.keystr(k)]
  assert backbone
  for k in backbone:  # the backbone is the cached model's, bit for bit
    np.testing.assert_array_equal(np.asarray(flat_loaded[k]), np.asarray(flat_want[k]), err_msg=str(k))


def _predict(args, cache, tmp_path):
  env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "depthvlm_jax.predict", *map(str, args)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_predict_cli_loads_a_model_by_hub_id(exported, tmp_path):
  hf_dir, _ = exported
  cache = tmp_path / "hub_cache"
  cache_model(cache, "JonnyYu828/DepthVLM-4B", hf_dir, MAIN)
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "X.jpg")
  proc = _predict(["--model", "JonnyYu828/DepthVLM-4B", "--image", tmp_path / "X.jpg", "--out", tmp_path / "D",
                   "--max_new_tokens", 2], cache, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  depth = np.load(tmp_path / "D" / "X_depth.npy")
  assert depth.shape == (48, 64) and np.isfinite(depth).all()

  proc = _predict(["--model", "JonnyYu828/DepthVLM-8B", "--image", tmp_path / "X.jpg", "--out", tmp_path / "E"],
                  cache, tmp_path)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert errors[0].startswith("error: JonnyYu828/DepthVLM-8B: ") and "HF_HUB_OFFLINE" in errors[0]
  assert not (tmp_path / "E").exists()
