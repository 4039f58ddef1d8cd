"""The Colab notebooks run top to bottom on CPU (tiny preset) and show depth images.

Each notebook is executed by nbclient in a fresh kernel, with CI's paths injected in a cell right
after the `parameters` cell (papermill style). The fine-tune notebook's workdir is the checkpoint
the quick start predicts with and the evaluate/export notebook evaluates and exports, as a user
would chain them.
"""

import json
import pathlib
import re

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this file out

NB_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, overrides: dict, monkeypatch) -> nbformat.NotebookNode:
  nb = nbformat.read(NB_DIR / name, as_version=4)
  idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  nb.cells.insert(idx + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items())))
  # the kernel inherits the environment: one CPU device, as on a user's machine (not the 8 simulated
  # devices of the other tests)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(NB_DIR)}}).execute()
  return nb


def outputs(nb, key=None):
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if key is None or key in out.get("data", {}):
        yield out


def text(nb) -> str:
  return "".join(o.get("text", "") for o in outputs(nb) if o.get("output_type") == "stream")


def assert_shows_png(nb):
  pngs = [o for o in outputs(nb, "image/png") if o["output_type"] == "display_data"]
  assert pngs, "no image/png display output"
  assert all(len(o["data"]["image/png"]) > 1000 for o in pngs)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("finetune")
  with pytest.MonkeyPatch.context() as mp:
    nb = execute("finetune.ipynb", {"WORKDIR": str(tmp / "run")}, mp)
  return nb, tmp / "run"


def test_finetune_notebook_trains_and_shows_depth(finetuned):
  nb, workdir = finetuned
  assert_shows_png(nb)
  out = text(nb)
  assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1} over 1 cpu device(s)" in out
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert all(r["finite"] for r in rows if "loss" in r)
  assert (workdir / "checkpoints").is_dir() and (workdir / "results.json").exists()


def test_evaluate_export_notebook(finetuned, tmp_path, monkeypatch):
  _, workdir = finetuned
  nb = execute("evaluate_export.ipynb", {"CHECKPOINT": str(workdir), "EVAL_DIR": str(tmp_path / "eval"),
                                         "EXPORT_DIR": str(tmp_path / "export")}, monkeypatch)
  assert_shows_png(nb)
  summary = json.loads((tmp_path / "eval" / "model" / "results.json").read_text())
  assert summary["datasets"]["synthetic_test"]["images"] == 4
  assert (tmp_path / "export" / "config.json").exists()
  # the exported PyTorch model gives the JAX depth map
  diff = float(re.search(r"max relative difference ([0-9.e+-]+)", text(nb)).group(1))
  assert diff < 1e-3


def test_quickstart_notebook(finetuned, tmp_path, monkeypatch):
  # the fine-tuned tiny run as the checkpoint (the random-model default costs another model init)
  _, workdir = finetuned
  nb = execute("quickstart.ipynb", {"CHECKPOINT": str(workdir), "OUT_DIR": str(tmp_path / "qs")}, monkeypatch)
  assert_shows_png(nb)
  assert list(outputs(nb, "application/vnd.plotly.v1+json")), "no interactive point cloud"
  assert (tmp_path / "qs" / "scene.ply").exists() and (tmp_path / "qs" / "scene_vis.png").exists()
  assert "answer:" in text(nb)
