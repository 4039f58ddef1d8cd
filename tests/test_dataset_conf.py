"""The authors' dataset files (`eval_datasets.conf`, `train_datasets.conf`) read as data: the
variables, `${...}` references, `_SAMPLES`, the default list, paths from a root; every bad value is
one error naming the variable. Used by `evaluate --datasets_conf` and `data.datasets_conf`."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from data_pipelines import dataset_conf
from data_pipelines.dataset_conf import DatasetConfError
from depthvlm_jax import evaluate, presets
from depthvlm_jax.model.config import ConfigError
from depthvlm_jax.train import trainer
from depthvlm_jax.train.config_checks import validate_config
from tests.evaluation.helpers import write_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]

# The layout of the authors' files: a few roots, then four variables per dataset, all as shell
# assignments with references to earlier variables; the scripts that source them add the list.
CONF = """\
# dataset paths (sourced by the shell scripts)
ANNO_ROOT="./annotations"
export DATA_ROOT="./datasets"

# ===== indoor =====
NYUV2_JSONL="${ANNO_ROOT}/nyuv2/test.jsonl"   # five records
NYUV2_IMAGE="${DATA_ROOT}/nyuv2/rgb"
NYUV2_DEPTH=$DATA_ROOT/nyuv2/depth
NYUV2_SAMPLES=2

ETH3D_JSONL="${ANNO_ROOT}/eth3d/test.jsonl"
ETH3D_IMAGE="${DATA_ROOT}/eth3d/rgb"
ETH3D_DEPTH="${DATA_ROOT}/eth3d/depth"
ETH3D_SAMPLES=0

# ===== outdoor =====
ARGOVERSE2_JSONL="${ANNO_ROOT}/argoverse2/test.jsonl"
ARGOVERSE2_IMAGE='${DATA_ROOT}/literal'
ARGOVERSE2_DEPTH="${DATA_ROOT}/argoverse2/depth"

build_args() {
  for ds in ${EVAL_DATASETS}; do
    NOT_A_SETTING="${ds}_JSONL"
  done
}

EVAL_DATASETS="NYUV2
  ETH3D"
echo "datasets: ${EVAL_DATASETS}"
"""


@pytest.fixture
def tree(tmp_path):
  """(conf file, root): the conf above and, under root, the nyuv2 (5 records) and eth3d (3) sets."""
  root = tmp_path / "authors_repo"
  for name, n in (("nyuv2", 5), ("eth3d", 3)):
    jsonl = write_dataset(root / "datasets" / name, n, seed=n)
    (root / "annotations" / name).mkdir(parents=True)
    jsonl.rename(root / "annotations" / name / "test.jsonl")
  conf = root / "configs" / "eval_datasets.conf"
  conf.parent.mkdir()
  conf.write_text(CONF)
  return conf, root


def test_variables_are_read_not_run(tree):
  conf, _ = tree
  values = dataset_conf.read_variables(conf, environ={})
  assert values["NYUV2_JSONL"] == "./annotations/nyuv2/test.jsonl"
  assert values["NYUV2_DEPTH"] == "./datasets/nyuv2/depth"
  assert values["ARGOVERSE2_IMAGE"] == "${DATA_ROOT}/literal"  # single quotes: no expansion
  assert values["EVAL_DATASETS"].split() == ["NYUV2", "ETH3D"]
  assert "NOT_A_SETTING" not in values and "ds" not in values  # function bodies are skipped


def test_datasets_paths_samples_and_default_list(tree):
  conf, root = tree
  got = dataset_conf.conf_datasets(conf, "NYUV2 ETH3D", root)
  assert [(d.name, d.samples, d.kind) for d in got] == [("nyuv2", 2, "nyuv2"), ("eth3d", 0, "eth3d")]
  assert got[0].jsonl == str(root / "annotations/nyuv2/test.jsonl")
  assert got[0].image_root == str(root / "datasets/nyuv2/rgb") and got[0].depth_root == str(root / "datasets/nyuv2/depth")
  assert dataset_conf.conf_datasets(conf, None, root) == got  # EVAL_DATASETS
  assert dataset_conf.conf_datasets(conf, "nyuv2,eth3d", root) == got


@pytest.mark.parametrize("edit,names,message", [
    (None, "NYUV2 KITTI", "unknown dataset 'KITTI' (KITTI_JSONL is not set); the file defines ARGOVERSE2, ETH3D, NYUV2"),
    (("ETH3D_DEPTH=", "# ETH3D_DEPTH="), "ETH3D", "ETH3D_DEPTH is not set"),
    (None, "ARGOVERSE2", "ARGOVERSE2_JSONL='./annotations/argoverse2/test.jsonl': file"),
    (("NYUV2_SAMPLES=2", "NYUV2_SAMPLES=all"), "NYUV2", "NYUV2_SAMPLES='all': expected a number of records"),
    (("NYUV2_IMAGE=", "NYUV2_IMAGE=$(pwd)/"), "NYUV2", "NYUV2_IMAGE uses a command substitution"),
    (("${ANNO_ROOT}/eth3d", "${ANNO_DIR}/eth3d"), "ETH3D", "ETH3D_JSONL refers to ${ANNO_DIR}, which is set neither"),
    (("EVAL_DATASETS=", "OTHER="), "", "no dataset names given and the file sets no EVAL_DATASETS"),
    (None, "NYUV2 nyuv2", "a dataset is listed twice"),
])
def test_errors_name_the_variable(tree, edit, names, message):
  conf, root = tree
  if edit:
    conf.write_text(CONF.replace(*edit))
  with pytest.raises(DatasetConfError) as e:
    dataset_conf.conf_datasets(conf, names, root, environ={})
  assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(str(conf))


def test_missing_directory_names_the_variable(tree):
  conf, root = tree
  (root / "datasets/eth3d/depth").rename(root / "datasets/eth3d/depth_moved")
  with pytest.raises(DatasetConfError, match=r"ETH3D_DEPTH='./datasets/eth3d/depth': directory .* not found"):
    dataset_conf.conf_datasets(conf, "ETH3D", root)


def test_evaluate_reads_the_conf(tree, tmp_path):
  conf, root = tree
  summary = evaluate.main(["--baseline", "constant:2", f"--datasets_conf={conf}", "--datasets=NYUV2 ETH3D",
                           f"--root={root}", "--out", str(tmp_path / "out"), "--modes", "dense"])
  assert {k: v["images"] for k, v in summary["datasets"].items()} == {"nyuv2": 2, "eth3d": 3}  # NYUV2_SAMPLES=2
  # the same run given with --data and the conf's values: the same table
  data = [f"nyuv2={root}/annotations/nyuv2/test.jsonl|{root}/datasets/nyuv2/rgb|{root}/datasets/nyuv2/depth",
          f"eth3d={root}/annotations/eth3d/test.jsonl|{root}/datasets/eth3d/rgb|{root}/datasets/eth3d/depth"]
  full = evaluate.main(["--baseline", "constant:2", "--data", data[0], "--data", data[1], "--out",
                        str(tmp_path / "out_data"), "--modes", "dense", "--limit", "2"])
  assert full["datasets"]["nyuv2"] == summary["datasets"]["nyuv2"]
  run = json.loads((tmp_path / "out" / "run.json").read_text())
  assert [d.get("samples", 0) for d in run["datasets"]] == [2, 0]
  with pytest.raises(SystemExit):  # --datasets without a file
    evaluate.main(["--baseline", "constant:2", "--datasets=NYUV2", "--out", str(tmp_path / "o2")])


@pytest.mark.slow
def test_evaluate_cli_error_is_one_line(tree, tmp_path):
  conf, root = tree
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-m", "depthvlm_jax.evaluate", "--baseline", "constant:2",
                         f"--datasets_conf={conf}", "--datasets=NYUV2 SUNRGBD", f"--root={root}", "--out",
                         str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: --datasets_conf: ") and "unknown dataset 'SUNRGBD'" in lines[0]
  assert not (tmp_path / "out").exists()


def _train_config(conf, root, datasets=""):
  config = presets.get_config(1, "default")
  config.data.kind = "jsonl"
  config.data.datasets_conf = str(conf)
  config.data.datasets = datasets
  config.data.datasets_root = str(root)
  return config


def test_training_config_maps_the_conf_to_train_files(tree):
  conf, root = tree
  conf.write_text(CONF.replace("NYUV2_SAMPLES=2", "NYUV2_SAMPLES=0").replace("EVAL_DATASETS", "TRAIN_DATASETS"))
  config = _train_config(conf, root)
  dataset_conf.apply_to_train_config(config)
  assert dict(config.data.train_files) == {
      "nyuv2": f"{root}/annotations/nyuv2/test.jsonl|{root}/datasets/nyuv2/rgb|{root}/datasets/nyuv2/depth|nyuv2",
      "eth3d": f"{root}/annotations/eth3d/test.jsonl|{root}/datasets/eth3d/rgb|{root}/datasets/eth3d/depth|eth3d"}
  validate_config(config)
  dataset_conf.apply_to_train_config(config)  # again (a resumed run): the same entries, no clash
  assert len(config.data.train_files) == 2


def test_training_config_errors(tree, tmp_path):
  conf, root = tree
  config = _train_config(conf, root, "NYUV2")
  with pytest.raises(ConfigError, match=r"NYUV2_SAMPLES=2: training reads every record"):
    dataset_conf.apply_to_train_config(config)
  config = _train_config(conf, root, "ETH3D")
  config.data.kind = "synthetic"
  with pytest.raises(ConfigError, match=r"needs data.kind='jsonl'"):
    dataset_conf.apply_to_train_config(config)
  config = _train_config(conf, root)  # no TRAIN_DATASETS in the file, no data.datasets
  with pytest.raises(ConfigError, match=r"^data.datasets_conf: .*sets no TRAIN_DATASETS"):
    dataset_conf.apply_to_train_config(config)
  config = _train_config(conf, root, "ETH3D KITTI")  # the trainer reads the file before any work
  with pytest.raises(ConfigError, match=r"unknown dataset 'KITTI'"):
    trainer.train_and_evaluate(config, str(tmp_path / "workdir"))
  assert not (tmp_path / "workdir").exists()
