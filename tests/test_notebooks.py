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


def _notebook_text(name: str) -> str:
  return "\n".join(c.source for c in nbformat.read(NB_DIR / name, as_version=4).cells)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "finetune.ipynb", "evaluate_export.ipynb"])
def test_notebooks_are_built_and_name_no_placeholder_url(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location("build_notebooks", NB_DIR / "build_notebooks.py")
  build = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(build)
  committed = nbformat.read(NB_DIR / name, as_version=4)
  assert [c.source for c in committed.cells] == [c.source for c in build.NOTEBOOKS[name].cells], \
      "the .ipynb differs from notebooks/build_notebooks.py: run it"
  text = _notebook_text(name)
  assert "YOUR_ORG" not in text
  urls = re.findall(r"https?://[^\s\"')]+", text)
  assert not [u for u in urls if re.search(r"your|<|>|\bORG\b|USER|example\.(com|org)", u, re.I)], urls
  assert re.search(r'^REPO_URL = ""  # <- set to your fork\'s git URL', text, re.M)


def _setup_kernel_run(cells: list[str], monkeypatch) -> nbformat.NotebookNode:
  """The notebooks' first code cell (the install cell) run in a fresh kernel between `cells[0]` and the rest."""
  setup = next(c for c in nbformat.read(NB_DIR / "quickstart.ipynb", as_version=4).cells if c.cell_type == "code")
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_code_cell(cells[0]), nbformat.v4.new_code_cell(setup.source)] + \
      [nbformat.v4.new_code_cell(c) for c in cells[1:]]
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                   resources={"metadata": {"path": str(NB_DIR)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError:
    pass
  return nb


@pytest.mark.slow
def test_install_cell_stops_with_one_line_while_repo_url_is_unset(monkeypatch):
  assert not pathlib.Path("/content/depthvlm-jax").exists()
  nb = _setup_kernel_run(["import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')",
                          "print('after setup')"], monkeypatch)
  errors = [o for o in nb.cells[1].outputs if o.output_type == "error"]
  assert len(errors) == 1 and errors[0].ename == "SetupStopped"
  assert errors[0].traceback == ["setup stopped: set REPO_URL in this cell to the git URL of your copy of "
                                 "depthvlm-jax, then run it again"]
  assert not nb.cells[2].outputs  # "Run all" stops at the install cell
  assert not [o for o in nb.cells[1].outputs if "git" in o.get("text", "")]


@pytest.mark.slow
def test_install_cell_pins_the_jax_stack_and_keeps_preinstalled_packages(tmp_path, monkeypatch):
  reqs = tmp_path / "requirements.txt"
  reqs.write_text("# comment\njax==0.10.2\nflax==0.12.8  # pinned\nnumpy==1.0.0\npillow==1.0\n"
                  "surely-not-installed-pkg==1.2.3\n")
  nb = _setup_kernel_run(["", f"print(pip_requirements({str(reqs)!r}))",
                          f"print(pip_requirements({str(reqs)!r}, tpu=True))"], monkeypatch)
  printed = [o.text.strip() for c in nb.cells[2:] for o in c.outputs if o.output_type == "stream"]
  assert printed == ["['jax==0.10.2', 'flax==0.12.8', 'surely-not-installed-pkg==1.2.3']",
                     "['jax[tpu]==0.10.2', 'flax==0.12.8', 'surely-not-installed-pkg==1.2.3']"]
