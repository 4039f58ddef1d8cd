"""Writes the Colab notebooks of this folder (outputs empty) from the cell sources below.

  python notebooks/build_notebooks.py

Edit the cells here, not in the .ipynb files, so the three notebooks stay consistent. Every notebook
runs top to bottom on a CPU with the tiny preset (CI executes them with nbclient, tests/test_notebooks.py)
and uses the accelerator when the Colab runtime has one. A cell tagged `parameters` holds what a user
changes; CI injects its own values in a cell right after it.
"""

from __future__ import annotations

import pathlib

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

SETUP = '''\
# Install (Colab only; skipped elsewhere): clone the project and add what the runtime lacks.
import importlib.metadata, importlib.util, os, pathlib, re, subprocess, sys

IN_COLAB = "google.colab" in sys.modules
REPO_URL = ""  # <- set to your fork's git URL (the cell stops here while it is empty)
REPO_BRANCH = ""  # branch or tag to clone ("" = the repository's default branch)
# Installed at the versions this project pins (the JAX stack it is tested with); every other
# requirement keeps the version the runtime already has and is installed at ours only when missing.
EXACT = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"}


class SetupStopped(Exception):
    """Stops "Run all" at this cell with one line instead of a traceback."""

    def _render_traceback_(self):
        return [f"setup stopped: {self}"]


def pip_requirements(path, tpu=False):
    """The pip arguments for a requirements file under the rule above (jax -> jax[tpu] on a TPU)."""
    out = []
    for line in pathlib.Path(path).read_text().splitlines():
        req = line.split("#")[0].strip()
        if not req:
            continue
        name = re.split(r"[=<>!~;\\[ ]", req)[0]
        if name.lower() in EXACT:
            out.append("jax[tpu]" + req[len(name):] if tpu and name == "jax" else req)
            continue
        try:
            importlib.metadata.version(name)  # preinstalled: left as it is
        except importlib.metadata.PackageNotFoundError:
            out.append(req)
    return out


if IN_COLAB:
    repo = pathlib.Path("/content/depthvlm-jax")
    if not repo.exists():
        if not REPO_URL.strip():
            raise SetupStopped("set REPO_URL in this cell to the git URL of your copy of depthvlm-jax, then run it again")
        branch = ["--branch", REPO_BRANCH] if REPO_BRANCH else []
        subprocess.run(["git", "clone", "--depth=1", *branch, REPO_URL.strip(), str(repo)], check=True)
    tpu = bool(os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("COLAB_TPU_ADDR") or pathlib.Path("/dev/accel0").exists())
    wanted = pip_requirements(repo / "requirements.txt", tpu)
    if importlib.util.find_spec("plotly") is None:
        wanted.append("plotly")
    print("pip install", " ".join(wanted))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *wanted], check=True)
    os.chdir(repo)
else:
    print("not on Colab: using the installed project (no pip install)")
# The repository root holds configs/ (plain Python files, not an installed package).
ROOT = next(p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / "configs" / "stage1.py").exists())
sys.path.insert(0, str(ROOT))
'''

DEVICES = '''\
# Which accelerator is there? The same code runs on TPU, GPU and CPU; only sizes change.
import jax

devices = jax.devices()
PLATFORM = devices[0].platform  # "tpu", "gpu" or "cpu"
ACCELERATOR = PLATFORM in ("tpu", "gpu")
print(f"{len(devices)} x {devices[0].device_kind} ({PLATFORM}), {jax.process_count()} process(es)")
if not ACCELERATOR:
    print("CPU only: the tiny preset and a few steps (Runtime > Change runtime type > TPU for the real thing)")
'''

SHOW = '''\
import io

import numpy as np
from IPython.display import Image as DisplayImage, display
from PIL import Image


def show(rgb: np.ndarray, caption: str = "") -> None:
    """Displays an (H, W, 3) uint8 image as PNG."""
    if caption:
        print(caption)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    display(DisplayImage(data=buf.getvalue()))
'''


def md(text):
  return nbformat.v4.new_markdown_cell(text)


def code(text, tags=()):
  cell = nbformat.v4.new_code_cell(text)
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


def notebook(cells):
  nb = nbformat.v4.new_notebook()
  for i, cell in enumerate(cells):
    cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating changes only the cells that changed
  nb.cells = cells
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata["accelerator"] = "TPU"
  nb.metadata["colab"] = {"provenance": []}
  return nb


# ----------------------------------------------------------------------------- (a) quick start
QUICKSTART = notebook([
    md("# DepthVLM-JAX quick start\n\n"
       "One forward pass of DepthVLM (Qwen3-VL + a DPT head) gives a **metric depth map** and the "
       "language model's **answer**. This notebook loads a model, predicts depth and a reply for an image, "
       "shows the colourised depth and an interactive 3-D point cloud.\n\n"
       "Model: a DepthVLM Hugging Face directory (e.g. one written by `python -m depthvlm_jax.export`), a "
       "hub id such as `JonnyYu828/DepthVLM-4B` (downloaded into the Hugging Face cache on first use) or a "
       "training workdir of this project. Without "
       "one, an embedded **tiny random model** is used: the pipeline runs, the depth is meaningless."),
    code(SETUP),
    code(DEVICES),
    code('''\
# Parameters
CHECKPOINT = ""  # DepthVLM HF directory, hub id org/name[@revision] or training workdir; "" = tiny random model
IMAGE = ""  # an RGB image; "" = a rendered synthetic street/room scene
FX = None  # focal length of IMAGE in pixels (None: a 60-degree horizontal field of view is assumed)
PROMPT = None  # None = the DepthVLM depth prompt; ask anything about the image instead
MAX_NEW_TOKENS = 64 if ACCELERATOR else 8
OUT_DIR = "/tmp/depthvlm_quickstart"
''', tags=("parameters",)),
    code(SHOW),
    md("## Load the model"),
    code('''\
import flax.linen as nn
from configs import stage1
from depthvlm_jax import export
from depthvlm_jax.evaluation.loading import load_model
from depthvlm_jax.model.depthvlm import depthvlm_dummy_inputs
from depthvlm_jax.train import trainer
from depthvlm_jax.runs import model_from_config

if not CHECKPOINT:  # the embedded default: the tiny model of the CPU preset, random weights, as a HF directory
    CHECKPOINT = f"{OUT_DIR}/tiny_random_model"
    if not pathlib.Path(CHECKPOINT, "config.json").exists():
        model = model_from_config.build_model(stage1.get_config("default"))
        init = jax.jit(lambda rng: nn.unbox(model.init(rng, **depthvlm_dummy_inputs(model.config))["params"]))
        export.write_hf_dir(jax.device_get(init(jax.random.key(0))), model.config, model.head, CHECKPOINT)
# On an accelerator: bf16 weights sharded FSDP over all chips (a 4B model does not fit one 16 GiB v5e chip in fp32).
import jax.numpy as jnp
from depthvlm_jax import sharding

mesh = sharding.make_mesh({"fsdp": -1}) if ACCELERATOR else None
loaded = load_model(CHECKPOINT, dtype=jnp.bfloat16 if ACCELERATOR else jnp.float32, mesh=mesh)
n_params = sum(x.size for x in jax.tree.leaves(loaded.params))
print(f"{loaded.kind} from {CHECKPOINT}: {n_params / 1e6:.1f} M parameters, trained head: {loaded.head_trained}")
'''),
    md("## Predict depth and an answer\n\n"
       "`predict_image` resizes the image so its focal length is 1000 px (as in training), runs one "
       "prefill that yields the depth map, decodes the answer from the same KV cache, resizes the depth "
       "back to the image and back-projects a point cloud with the intrinsics."),
    code('''\
from depthvlm_jax import predict

if not IMAGE:
    from data_pipelines import synthetic
    scene = synthetic.make_scene(7)
    rgb, gt_depth, _ = synthetic.render(scene)
    IMAGE, FX = f"{OUT_DIR}/scene.png", scene.fx
    pathlib.Path(OUT_DIR).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(IMAGE)
result = predict.predict_image(loaded, IMAGE, fx=FX, prompt=PROMPT, out_dir=OUT_DIR, max_new_tokens=MAX_NEW_TOKENS)
depth = result["depth"]
print("answer:", repr(result["text"]))
print(f"depth {depth.shape[1]}x{depth.shape[0]}: {depth.min():.2f} .. {depth.max():.2f} m (median {np.median(depth):.2f} m), "
      f"fx = {result['fx']:.1f} px")
print("files:", result["files"])
'''),
    code('''\
# RGB | depth (Turbo colour map over the 2nd-98th percentile range)
show(np.asarray(Image.open(result["files"]["vis"]).convert("RGB")), "RGB | predicted depth")
'''),
    md("## Interactive 3-D point cloud\n\nDrag to rotate. (plotly when installed, else a static matplotlib view.)"),
    code('''\
points, colours = result["points"], result["colours"]  # (N, 3) metres in the camera frame, (N, 3) uint8
keep = np.random.default_rng(0).choice(len(points), min(len(points), 20000), replace=False)
p, c = points[keep], colours[keep]
try:
    import plotly.graph_objects as go
    import plotly.io as pio

    pio.renderers.default = "colab" if IN_COLAB else "plotly_mimetype+notebook_connected"
    fig = go.Figure(go.Scatter3d(x=p[:, 0], y=p[:, 2], z=-p[:, 1], mode="markers",  # camera y points down
                                 marker=dict(size=1.5, color=[f"rgb({r},{g},{b})" for r, g, b in c])))
    fig.update_layout(scene=dict(aspectmode="data", xaxis_title="x (m)", yaxis_title="depth (m)",
                                 zaxis_title="up (m)"), height=600, margin=dict(l=0, r=0, t=0, b=0))
    fig.show()
except ImportError:
    try:
        import matplotlib.pyplot as plt

        ax = plt.figure(figsize=(7, 6)).add_subplot(projection="3d")
        ax.scatter(p[:, 0], p[:, 2], -p[:, 1], c=c / 255.0, s=0.5)
        ax.set_xlabel("x (m)"), ax.set_ylabel("depth (m)"), ax.set_zlabel("up (m)")
        plt.show()
    except ImportError:
        print("install plotly (or matplotlib) for the 3-D view; the PLY file is", result["files"]["ply"])
'''),
])

# ----------------------------------------------------------------------------- (b) fine-tune
FINETUNE = notebook([
    md("# Fine-tune DepthVLM on your RGB-D data (Colab TPU)\n\n"
       "Stage 1 trains the depth head only (vision tower, LLM and LM head frozen) with the SILog depth "
       "loss; stage 2 continues from a stage-1 run and trains LLM + LM head + depth head with depth + LM "
       "losses. The two stages differ only in their config (`configs/stage1.py`, `configs/stage2.py`); "
       "training is `trainer.train_and_evaluate(config, workdir)`, the same call as `main.py`.\n\n"
       "**Your data**: a folder with `train.jsonl` (and optionally `test.jsonl`), one record per image in "
       "the DepthVLM annotation format: `image`, `depth_path` (relative to the folder), `depth_scale` "
       "(raw / scale = metres), `original_rgb_size` [W, H], `original_fx`, `canonical_fx` (1000), "
       "optionally `prompt` / `solution` for stage 2. Images are resized to focal length 1000 px and "
       "resized into the `IMAGE_SIZE` bucket with their aspect kept (padded, not cropped).\n\n"
       "On a TPU runtime set `PRESET = \"paper_4b\"` and `HF_DIR` to a Qwen3-VL-4B-Instruct "
       "directory or its hub id `Qwen/Qwen3-VL-4B-Instruct`; the mesh then shards parameters FSDP over all chips (see the printed mesh and the "
       "per-device memory). On CPU (CI) the tiny preset trains a few steps on a synthetic folder."),
    code(SETUP),
    code(DEVICES),
    code('''\
# Parameters
STAGE = 1  # 1: depth head only; 2: LLM + LM head + depth head (set INIT_FROM to the stage-1 workdir)
PRESET = "paper_4b" if PLATFORM == "tpu" else "default"  # "default" = tiny random model for CPU
HF_DIR = ""  # Qwen3-VL-Instruct: local directory or hub id, e.g. "Qwen/Qwen3-VL-4B-Instruct" (paper presets)
INIT_FROM = ""  # stage 2: the stage-1 workdir
DATA_DIR = ""  # your RGB-D folder (train.jsonl [+ test.jsonl]); "" = write a small synthetic folder
DATASET_KIND = "synthetic"  # depth range / crop rules of your data, e.g. "scannetpp", "nyuv2" (data_pipelines.rgbd)
WORKDIR = "/tmp/depthvlm_finetune"
STEPS = 0 if ACCELERATOR else 3  # 0 = one epoch as the config says
GLOBAL_BATCH = None if ACCELERATOR else 4  # None = the preset's
IMAGE_SIZE = None if ACCELERATOR else (96, 128)  # (H, W) bucket, multiples of 32; None = the preset's
''', tags=("parameters",)),
    code(SHOW),
    md("## Data folder"),
    code('''\
from data_pipelines import rgbd, synthetic

if not DATA_DIR:  # a synthetic folder in exactly the layout expected from yours
    DATA_DIR = f"{WORKDIR}_data"
    synthetic.ensure_synthetic_dataset(DATA_DIR, num_train=16, num_test=2, seed=0)
data = pathlib.Path(DATA_DIR)
if not (data / "train.jsonl").exists():
    raise FileNotFoundError(f"{data}/train.jsonl not found: DATA_DIR must hold train.jsonl (DepthVLM annotation format)")
records, bad = rgbd.read_jsonl(data / "train.jsonl")
print(f"{data}: {len(records)} training records ({len(bad)} unreadable lines)"
      + (", test.jsonl present" if (data / "test.jsonl").exists() else ""))
'''),
    md("## Config"),
    code('''\
from configs import stage1, stage2

if PRESET != "default" and not (HF_DIR or INIT_FROM):
    raise ValueError(f"PRESET={PRESET!r} starts from Qwen3-VL-Instruct: set HF_DIR to its directory or hub id "
                     "(or INIT_FROM to a previous run), or use PRESET='default' for the tiny model")
config = (stage1 if STAGE == 1 else stage2).get_config(PRESET)
with config.unlocked():
    config.data.kind = "jsonl"
    config.data.train_files = {"mydata": f"{data}/train.jsonl|{data}|{data}|{DATASET_KIND}"}
    config.data.eval_files = ({"mydata_test": f"{data}/test.jsonl|{data}|{data}|{DATASET_KIND}"}
                              if (data / "test.jsonl").exists() else {})
    config.model.hf_dir = HF_DIR
    config.model_init = INIT_FROM
    if STEPS:
        config.train.total_steps = STEPS
        config.log_every = 1
        config.ckpt_every = STEPS
    if GLOBAL_BATCH:
        config.train.global_batch, config.train.micro_batches = GLOBAL_BATCH, 1
    if IMAGE_SIZE:
        config.data.buckets = (IMAGE_SIZE,)
print(f"stage {config.stage}, preset {config.preset}, trainable {list(map(tuple, config.train.trainable))}")
print(f"lr {config.train.lr}, global batch {config.train.global_batch} x {config.train.micro_batches} micro-batches, "
      f"buckets {tuple(map(tuple, config.data.buckets))}, seq {config.data.seq_len}, remat {config.model.remat}")
'''),
    md("## Mesh and per-device memory"),
    code('''\
import jax

from depthvlm_jax import aot

# Abstract shapes with the trainer's shardings on these devices: nothing is allocated.
setup = aot.make_setup(config, topology=None, devices=jax.devices())
inputs = aot.train_inputs(setup)
mesh = setup.mesh
print("mesh", dict(mesh.shape), "over", mesh.devices.size, PLATFORM, "device(s)")
count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
print(f"{(count(inputs.state['params']) + count(inputs.frozen)) / 1e6:.1f} M parameters, "
      f"{count(inputs.state['params']) / 1e6:.1f} M trainable; per device: train state (params + optimizer) "
      f"{aot.shard_bytes(inputs.state) / 2**30:.3f} GiB, frozen params {aot.shard_bytes(inputs.frozen) / 2**30:.3f} GiB")
'''),
    md("## Train"),
    code('''\
import json

from depthvlm_jax.train import trainer

results = trainer.train_and_evaluate(config, WORKDIR)
rows = [json.loads(l) for l in open(f"{WORKDIR}/metrics.jsonl")]
for r in rows:
    if "loss" in r:
        print(f"step {r['step']:5d}  loss {r['loss']:.4f}  depth {r['depth_loss']:.4f}  lm {r['lm_loss']:.4f}  "
              f"grad-norm {r['grad_norm']:.3f}")
print({k: v for k, v in results.items() if k != "skipped_samples"})
'''),
    md("## Look at a prediction of the fine-tuned model"),
    code('''\
from depthvlm_jax.evaluation import outputs, predictors, protocol
from depthvlm_jax.evaluation.loading import load_model
from depthvlm_jax.processing.chat import DEFAULT_PROMPT

loaded = load_model(WORKDIR, mesh=mesh)
predictor = predictors.ModelPredictor(loaded, batch_size=1, mesh=mesh)
split = "test" if (data / "test.jsonl").exists() else "train"
record = rgbd.read_jsonl(data / f"{split}.jsonl")[0][0]
sample = rgbd.load_sample(record, data, data, DATASET_KIND)  # focal-unified (canonical) image and GT
pred = protocol.resize_map(predictor.depth_at_processed([sample.image], [DEFAULT_PROMPT])[0],
                           sample.depth.shape)
value_range = outputs.percentile_range(sample.depth[sample.depth > 0])
show(np.concatenate([sample.image, outputs.colorize_depth(pred, value_range),
                     outputs.colorize_depth(sample.depth, value_range)], axis=1),
     f"{record.image}: RGB | predicted | ground truth (same colour range)")
'''),
])

# ----------------------------------------------------------------------------- (c) evaluate + export
EVALUATE = notebook([
    md("# Evaluate DepthVLM and export it to PyTorch\n\n"
       "1. δ1 and the standard depth metrics with the DepthVLM-Bench protocol (`depthvlm_jax.evaluate`): "
       "sparse (sampled `pixel_coords`) and/or dense, per dataset and averaged, next to a constant-depth "
       "baseline.\n"
       "2. Export to a Hugging Face directory (`depthvlm_jax.export`) and load it in PyTorch "
       "(`depthvlm_jax.torch_export.DepthVLMForConditionalGeneration`, plain `transformers` for the "
       "backbone); the two frameworks' depth maps are compared on one image.\n\n"
       "`CHECKPOINT` is a training workdir (e.g. from the fine-tune notebook), a DepthVLM HF directory or a "
       "hub id (`org/name[@revision]`)."),
    code(SETUP),
    code(DEVICES),
    code('''\
# Parameters
CHECKPOINT = "/tmp/depthvlm_finetune"  # training workdir, DepthVLM HF directory or hub id org/name
# NAME=JSONL|IMAGE_ROOT|DEPTH_ROOT[|KIND] per test set; [] = a small synthetic test set
DATA = []
MODES = ("dense",)  # add "sparse" for annotation files with pixel_coords (DepthVLM-Bench)
LIMIT = None  # first N records per set
BATCH = 8 if ACCELERATOR else 2
EVAL_DIR = "/tmp/depthvlm_eval"
EXPORT_DIR = "/tmp/depthvlm_export"
''', tags=("parameters",)),
    code(SHOW),
    md("## Evaluate"),
    code('''\
from data_pipelines import synthetic
from depthvlm_jax import sharding
from depthvlm_jax.evaluation import predictors, runner
from depthvlm_jax.evaluation.loading import load_model
from depthvlm_jax.model.hub import parse_hub_id

if not pathlib.Path(CHECKPOINT).exists() and parse_hub_id(CHECKPOINT) is None:
    raise FileNotFoundError(f"CHECKPOINT={CHECKPOINT!r} does not exist: run the fine-tune notebook first, "
                            "or point it at a DepthVLM HF directory or hub id")
if not DATA:
    root = synthetic.ensure_synthetic_dataset(f"{EVAL_DIR}_data", num_train=0, num_test=4, seed=1)["test"].parent
    DATA = [f"synthetic_test={root}/test.jsonl|{root}|{root}|synthetic"]
datasets = [runner.parse_dataset(d) for d in DATA]
mesh = sharding.make_mesh({"data": -1})
print("mesh", dict(mesh.shape))
loaded = load_model(CHECKPOINT, mesh=mesh)
predictor = predictors.ModelPredictor(loaded, batch_size=BATCH, mesh=mesh)
summary = runner.run(predictor, datasets, f"{EVAL_DIR}/model", modes=MODES, limit=LIMIT, progress=False)
baseline = runner.run(predictors.ConstantDepth(2.0), datasets, f"{EVAL_DIR}/constant_2m", modes=MODES,
                        limit=LIMIT, progress=False)
print(summary["table"])
print()
print("constant 2 m baseline:")
print(baseline["table"])
'''),
    code('''\
# One evaluated image: RGB | prediction | ground truth on the canonical grid (same colour range)
from data_pipelines import rgbd
from depthvlm_jax.evaluation import outputs, protocol
from depthvlm_jax.processing.chat import DEFAULT_PROMPT

ds = datasets[0]
record = rgbd.read_jsonl(ds.jsonl)[0][0]
sample = rgbd.load_sample(record, ds.image_root, ds.depth_root, ds.dataset_kind)
pred_processed = predictor.depth_at_processed([sample.image], [record.prompt or DEFAULT_PROMPT])[0]
pred = protocol.resize_map(pred_processed, sample.depth.shape)
value_range = outputs.percentile_range(sample.depth[sample.depth > 0])
show(np.concatenate([sample.image, outputs.colorize_depth(pred, value_range),
                     outputs.colorize_depth(sample.depth, value_range)], axis=1), f"{ds.name}: {record.image}")
'''),
    md("## Export to a Hugging Face directory and run it in PyTorch"),
    code('''\
from depthvlm_jax import export

out = export.write_hf_dir(jax.device_get(loaded.params), loaded.model.config, loaded.model.head, EXPORT_DIR)
print(sorted(p.name for p in out.iterdir()))
'''),
    code('''\
import torch

from depthvlm_jax.model.inputs import make_model_inputs
from depthvlm_jax.processing import chat
from depthvlm_jax.processing.image_processor import preprocess_image
from depthvlm_jax.torch_export import DepthVLMForConditionalGeneration

torch_model = DepthVLMForConditionalGeneration.from_pretrained(out, torch_dtype=torch.float32).eval()
hp, wp = predictor.processed_hw(sample.image.shape[:2])
patches, grid = preprocess_image(sample.image, loaded.processor, size=(hp, wp))
ids = chat.encode_sample(loaded.tokenizer, record.prompt or chat.DEFAULT_PROMPT,
                         [(hp // 32) * (wp // 32)])["input_ids"]
batch = make_model_inputs([ids], loaded.model.config, [patches], [grid[1:]])
_, torch_depths = torch_model.depth_forward(torch.tensor(batch["input_ids"], dtype=torch.long),
                                            torch.tensor(batch["attention_mask"]), torch.tensor(patches),
                                            torch.tensor([list(grid)]))
torch_depth = torch_depths[0].numpy()
rel = np.abs(torch_depth - pred_processed) / pred_processed
print(f"PyTorch vs JAX depth on {hp}x{wp}: max relative difference {rel.max():.2e}, median {np.median(rel):.2e}")
show(np.concatenate([outputs.colorize_depth(pred_processed, value_range),
                     outputs.colorize_depth(torch_depth, value_range)], axis=1), "JAX | PyTorch")
'''),
])

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "finetune.ipynb": FINETUNE, "evaluate_export.ipynb": EVALUATE}


def main():
  for name, nb in NOTEBOOKS.items():
    nbformat.validate(nb)
    nbformat.write(nb, HERE / name)
    print("wrote", HERE / name)


if __name__ == "__main__":
  main()
