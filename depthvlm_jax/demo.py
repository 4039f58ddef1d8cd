"""Web demo: metric depth, a point cloud and the answer for an uploaded image, in the browser.

  python -m depthvlm_jax.demo [--model DIR_OR_CKPT] [--host 127.0.0.1] [--port 7860]

`--model` takes what `predict` takes (a Hugging Face-layout DepthVLM/Qwen3-VL directory or a training
workdir). Without it the demo uses the README's default run (stage 2, else stage 1) when that workdir
holds a checkpoint, else a tiny randomly initialised model, and the page says which.

Every request goes through `predict.predict_image` (same camera handling, one prefill for depth and
text) and `predict.write_outputs`, so the downloaded files equal the `predict` CLI's for the same
image, focal length and model. The page adds:
  * the Turbo depth map (2nd-98th percentile, as in `predict`'s visualisation) with a colour bar in
    metres, and the depth at a clicked pixel;
  * the point cloud as a .glb (trimesh; at most `VIEWER_POINTS` points, every k-th, for the viewer;
    axes turned to glTF's y-up, camera-looks-down-minus-z frame) in `gr.Model3D`;
  * downloads: depth .npy (metres), 16-bit PNG (millimetres), binary .ply, and the .json summary.

`generate.generate_tokens` is jitted with static shapes, so each image bucket (processed size and
padded prompt length) compiles once and later requests of that bucket reuse the program; the status
line says which happened. Requests are queued and run one at a time. Uploads are checked before any
work (empty file, not an image, more than `MAX_IMAGE_PIXELS`, a focal length that makes the
canonical image larger than `MAX_CANONICAL_PIXELS`); the page shows a one-line message and the
server carries on. Gradio's analytics are off and no share link is made unless `--share` asks for
one: the page only talks to this server. Without `--out` the request files go to a temporary
folder that is deleted when the demo stops (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from typing import Any, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import numpy as np
from absl import flags
from PIL import Image, UnidentifiedImageError

from depthvlm_jax.presets import default_workdir
from data_pipelines import rgbd
from depthvlm_jax import predict
from depthvlm_jax.evaluation import outputs
from depthvlm_jax.processing.chat import DEFAULT_PROMPT

# Where `python main.py --config=configs/stage{2,1}.py` writes without --workdir, newest stage first.
DEFAULT_WORKDIRS = (default_workdir(2, "default"), default_workdir(1, "default"))
MAX_IMAGE_PIXELS = 40_000_000  # uploads above this are refused before decoding
MAX_CANONICAL_PIXELS = 40_000_000  # image resized to the canonical focal length
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
VIEWER_POINTS = 150_000
FOV = "horizontal field of view (degrees)"
FX = "focal length (pixels)"
EXAMPLE_SEEDS = ((3, "indoor"), (11, "outdoor"), (5, "indoor"))


class DemoError(ValueError):
  """A request the demo refuses (message is shown on the page as is)."""


# ---------------------------------------------------------------------------------------------------
# Model choice


def _has_checkpoint(workdir: pathlib.Path) -> bool:
  ckpt = workdir / "checkpoints"
  return (workdir / "config.json").exists() and ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def write_tiny_random_model(out_dir: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
  """An HF-layout tiny DepthVLM with random weights (`Qwen3VLConfig.tiny`, `DepthHeadConfig.tiny`)."""
  from depthvlm_jax import export
  from depthvlm_jax.model.config import Qwen3VLConfig
  from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, random_params
  config = Qwen3VLConfig.tiny(tie_word_embeddings=True)
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  return pathlib.Path(export.write_hf_dir(random_params(model, seed=seed), config, model.head, out_dir))


def choose_model(model: str | None, scratch: pathlib.Path,
                 default_workdirs: Sequence[str] = DEFAULT_WORKDIRS) -> tuple[str, str]:
  """(model path, sentence for the page) for `--model` or the default run or a tiny random model."""
  if model:
    return model, f"Model: `{model}`."
  for d in map(pathlib.Path, default_workdirs):
    if d.is_dir() and _has_checkpoint(d):
      return str(d), f"Model: the trained default run `{d}` (no `--model` given)."
  path = write_tiny_random_model(scratch / "tiny_random_model")
  note = ("Model: **a tiny randomly initialised DepthVLM** (no `--model` given and no trained default run in "
          f"{' or '.join(f'`{d}`' for d in default_workdirs)}). Its depth maps and answers are meaningless; "
          "train with `python main.py --config=configs/stage1.py` (it writes to `runs/stage1_default`) or pass "
          "`--model`.")
  return str(path), note


# ---------------------------------------------------------------------------------------------------
# Requests (no gradio here: these are tested directly)


def read_upload(path: str | pathlib.Path | None) -> np.ndarray:
  """(H, W, 3) uint8 RGB of an uploaded file, decoded as `predict` decodes it; DemoError if unusable."""
  if path is None:
    raise DemoError("No image: upload one or pick an example scene.")
  p = pathlib.Path(path)
  size = p.stat().st_size if p.exists() else -1
  if size < 0:
    raise DemoError(f"{p.name}: the upload did not arrive; try again.")
  if size == 0:
    raise DemoError(f"{p.name}: empty file (0 bytes); expected an image (PNG, JPEG, BMP, WebP or TIFF).")
  if size > MAX_UPLOAD_BYTES:
    raise DemoError(f"{p.name}: {size / 2**20:.0f} MiB is too large (at most {MAX_UPLOAD_BYTES // 2**20} MiB).")
  try:
    with Image.open(p) as im:  # reads the header only
      w, h = im.size
  except Image.DecompressionBombError:
    raise DemoError(f"{p.name}: enormous image (more than {Image.MAX_IMAGE_PIXELS * 2:,} pixels); "
                    f"at most {MAX_IMAGE_PIXELS:,} pixels.") from None
  except (UnidentifiedImageError, OSError, ValueError):
    raise DemoError(f"{p.name}: not an image (expected PNG, JPEG, BMP, WebP or TIFF).") from None
  if w * h > MAX_IMAGE_PIXELS:
    raise DemoError(f"{p.name}: enormous image ({w} x {h} = {w * h:,} pixels); at most {MAX_IMAGE_PIXELS:,} pixels.")
  try:
    return rgbd.load_rgb(p)
  except rgbd.SampleError:
    raise DemoError(f"{p.name}: the image is damaged and cannot be decoded.") from None


def focal_px(mode: str, value: float | None, width: int, height: int) -> float:
  """fx in pixels from a focal length or a horizontal field of view; checks the canonical size."""
  if value is None or not math.isfinite(float(value)) or float(value) <= 0:
    raise DemoError(f"{mode}: expected a positive number, got {value!r}.")
  value = float(value)
  if mode == FOV:
    if not value < 180:
      raise DemoError(f"field of view {value:g}°: expected between 0 and 180 degrees.")
    fx = width * (0.5 / math.tan(math.radians(value) / 2))
  else:
    fx = value
  cw, ch = rgbd.canonical_size((width, height), fx, predict.CANONICAL_FX)
  if cw * ch > MAX_CANONICAL_PIXELS:
    raise DemoError(f"focal length {fx:.1f} px is too short for a {width} x {height} image: resizing it to the "
                    f"model's {predict.CANONICAL_FX:g} px focal length gives {cw} x {ch} pixels "
                    f"(at most {MAX_CANONICAL_PIXELS:,}).")
  return fx


def safe_stem(filename: str) -> str:
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", pathlib.Path(filename).stem).strip("._")
  return stem[:64] or "image"


def write_glb(path: str | pathlib.Path, points: np.ndarray, colours: np.ndarray,
              max_points: int = VIEWER_POINTS) -> int:
  """Every k-th point (at most max_points) as a glTF binary point cloud in glTF axes; returns the count.

  Camera frame (x right, y down, z forward) -> glTF (x right, y up, looking down -z): (x, -y, -z).
  """
  import trimesh
  step = max(1, -(-len(points) // max_points))
  p = points[::step] * np.array([1.0, -1.0, -1.0], np.float32)
  rgba = np.concatenate([colours[::step], np.full((len(p), 1), 255, np.uint8)], 1)
  pathlib.Path(path).write_bytes(trimesh.Scene(trimesh.PointCloud(p, colors=rgba)).export(file_type="glb"))
  return len(p)


def colour_bar_html(lo: float, hi: float, ticks: int = 5) -> str:
  """A horizontal Turbo colour bar from lo to hi metres (the depth image's colour range)."""
  stops = ", ".join(f"rgb{tuple(int(c) for c in outputs.turbo(np.array(t)))} {t * 100:.0f}%"
                    for t in np.linspace(0, 1, 11))
  step = (hi - lo) / (ticks - 1)
  decimals = min(4, max(2, math.ceil(-math.log10(step)) + 1)) if step > 0 else 2  # distinct labels
  labels = "".join(f"<span>{lo + (hi - lo) * t:.{decimals}f} m</span>" for t in np.linspace(0, 1, ticks))
  return (f'<div id="colourbar-scale" data-lo="{lo:.6g}" data-hi="{hi:.6g}">'
          f'<div style="height:16px;border-radius:3px;background:linear-gradient(to right, {stops})"></div>'
          f'<div style="display:flex;justify-content:space-between;font-size:0.85em">{labels}</div></div>')


class Predictor:
  """Holds the loaded model and the output folder; one call per request (the queue serialises them)."""

  def __init__(self, loaded, out_root: str | pathlib.Path, keep_s: float = 3600.0):
    self.loaded = loaded
    self.out_root = pathlib.Path(out_root)
    self.out_root.mkdir(parents=True, exist_ok=True)
    self.keep_s = keep_s

  def _request_dir(self) -> pathlib.Path:
    now = time.time()
    for d in self.out_root.glob("req_*"):  # drop old requests' files
      if now - d.stat().st_mtime > self.keep_s:
        shutil.rmtree(d, ignore_errors=True)
    d = self.out_root / f"req_{uuid.uuid4().hex[:12]}"
    d.mkdir()
    return d

  def __call__(self, upload: str | None, fx_mode: str, fx_value: float | None, prompt: str | None,
               max_new_tokens: int = 64, name: str | None = None) -> dict[str, Any]:
    """predict_image + files for one upload. Returns predict's result dict plus glb, status, timing."""
    from depthvlm_jax import generate as gen
    rgb = read_upload(upload)
    h, w = rgb.shape[:2]
    fx = focal_px(fx_mode, fx_value, w, h)
    max_new_tokens = int(max_new_tokens)
    if not 1 <= max_new_tokens <= 1024:
      raise DemoError(f"max new tokens {max_new_tokens}: expected 1 to 1024.")
    out = self._request_dir()
    name = name or safe_stem(pathlib.Path(upload).name)
    programs = gen.generate_tokens._cache_size()
    t0 = time.perf_counter()
    result = predict.predict_image(self.loaded, rgb, fx, (prompt or "").strip() or None, out, name, max_new_tokens)
    result["seconds"] = time.perf_counter() - t0
    result["compiled"] = gen.generate_tokens._cache_size() > programs
    result["programs"] = gen.generate_tokens._cache_size()
    result["files"]["glb"] = str(out / f"{name}.glb")
    result["viewer_points"] = write_glb(result["files"]["glb"], result["points"], result["colours"])
    return result


def status_line(r: dict[str, Any]) -> str:
  hp, wp = r["processed_size"]
  how = ("compiled a new program for this bucket" if r["compiled"] else "reused the compiled program of this bucket")
  return (f"Done in {r['seconds']:.1f} s: depth and answer from one forward pass at {wp} x {hp} px "
          f"(fx = {r['fx']:.1f} px); {how} ({r['programs']} compiled so far). "
          f"Point cloud: {len(r['points']):,} points ({r['viewer_points']:,} shown).")


# ---------------------------------------------------------------------------------------------------
# The page


def write_examples(out_dir: pathlib.Path) -> list[list[Any]]:
  """Renders the example scenes (data_pipelines.synthetic) as PNGs; [[path, FX, fx], ...]."""
  from data_pipelines import synthetic
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for seed, kind in EXAMPLE_SEEDS:
    scene = synthetic.make_scene(seed, kind)
    rgb, _, _ = synthetic.render(scene)
    path = out_dir / f"{kind}_scene_{seed}.png"
    Image.fromarray(rgb).save(path)
    rows.append([str(path), FX, round(float(scene.fx), 2)])
  return rows


def build_app(predictor: Predictor, model_note: str, examples: list[list[Any]]):
  """The gradio Blocks page (see the module docstring)."""
  import gradio as gr

  def on_upload(upload):
    if upload is None:
      return None, ""
    try:
      rgb = read_upload(upload)
    except DemoError as e:
      return None, f"**Error:** {e}"
    h, w = rgb.shape[:2]
    return rgb, f"{pathlib.Path(upload).name}: {w} x {h} px. Press **Estimate depth**."

  def on_run(upload, fx_mode, fx_value, prompt, max_new_tokens):
    blank = (None, "", "", None, None, None, "Click the depth map to read the depth at a pixel.")
    try:
      r = predictor(upload, fx_mode, fx_value, prompt, max_new_tokens)
    except DemoError as e:
      return (f"**Error:** {e}",) + blank
    except Exception as e:  # keep serving; the log has the traceback
      logging.exception("demo request failed")
      return (f"**Error:** the request failed ({type(e).__name__}: {e}).",) + blank
    lo, hi = outputs.percentile_range(r["depth"])
    f = r["files"]
    downloads = [f["npy"], f["png"], f["ply"], f["json"]]
    return (status_line(r), outputs.colorize_depth(r["depth"], (lo, hi)), colour_bar_html(lo, hi), r["text"],
            f["glb"], downloads, r["depth"], "Click the depth map to read the depth at a pixel.")

  def on_click(depth, evt: gr.SelectData):
    if depth is None or evt.index is None:
      return "Run the model first."
    x, y = (int(v) for v in evt.index)
    if not (0 <= y < depth.shape[0] and 0 <= x < depth.shape[1]):
      return f"Pixel (x={x}, y={y}) is outside the {depth.shape[1]} x {depth.shape[0]} image."
    d = float(depth[y, x])
    if not (math.isfinite(d) and d > 0):
      return f"Pixel (x={x}, y={y}): no valid depth."
    return f"Pixel (x={x}, y={y}): depth **{d:.4f} m**"

  # This module's annotations are strings (PEP 563); gradio finds the event argument by its class.
  on_click.__annotations__["evt"] = gr.SelectData

  # delete_cache: gradio's copies of served files older than an hour go every hour (as ours do).
  with gr.Blocks(title="DepthVLM-JAX demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
    gr.Markdown("## DepthVLM (JAX): metric depth and an answer from one forward pass\n" + model_note,
                elem_id="model-note")
    depth_state = gr.State(None)
    with gr.Row():
      with gr.Column(scale=1):
        upload = gr.File(label="Image (PNG, JPEG, BMP, WebP or TIFF)", file_count="single", type="filepath",
                         elem_id="upload")
        preview = gr.Image(label="Input", interactive=False, height=220, elem_id="preview")
        with gr.Row():
          fx_mode = gr.Radio([FOV, FX], value=FOV, label="Camera", elem_id="fx-mode")
          fx_value = gr.Number(value=60, label="Field of view (°) or focal length (px)", elem_id="fx-value")
        prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Prompt", lines=3, elem_id="prompt")
        max_new_tokens = gr.Slider(1, 256, value=64, step=1, label="Max new tokens", elem_id="max-new-tokens")
        run = gr.Button("Estimate depth", variant="primary", elem_id="run")
      with gr.Column(scale=2):
        status = gr.Markdown(elem_id="status")
        with gr.Row():
          with gr.Column():
            depth_image = gr.Image(label="Depth (Turbo, 2nd-98th percentile); click a pixel", interactive=False,
                                   format="png", elem_id="depth")
            colour_bar = gr.HTML(elem_id="colourbar")
            clicked = gr.Markdown("Click the depth map to read the depth at a pixel.", elem_id="clicked")
          cloud = gr.Model3D(label="Point cloud (drag to rotate)", clear_color=(0.1, 0.1, 0.1, 1.0), height=320,
                             elem_id="cloud")
        answer = gr.Textbox(label="Answer", lines=3, interactive=False, elem_id="answer")
        downloads = gr.File(label="Downloads: depth .npy (m), 16-bit PNG (mm), .ply, .json", file_count="multiple",
                            interactive=False, elem_id="downloads")
    # The preview column only shows each example's thumbnail (the upload's change event sets it anyway).
    gr.Examples(examples=[[path, path, mode, fx] for path, mode, fx in examples],
                inputs=[preview, upload, fx_mode, fx_value],
                label="Example scenes (rendered by data_pipelines.synthetic, with their true focal length)")
    upload.change(on_upload, [upload], [preview, status], queue=False)
    run.click(on_run, [upload, fx_mode, fx_value, prompt, max_new_tokens],
              [status, depth_image, colour_bar, answer, cloud, downloads, depth_state, clicked],
              concurrency_limit=1)
    depth_image.select(on_click, [depth_state], [clicked], queue=False)
  return app


PROG = "python -m depthvlm_jax.demo"
# Flags of their own (not absl's global set): predict, imported here, defines flags of the same names.
FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "HF-layout DepthVLM/Qwen3-VL directory, hub id org/name[@revision], or a training "
                    f"workdir (default: the trained default run in {' or '.join(DEFAULT_WORKDIRS)}, else a tiny "
                    "random model)", flag_values=FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "address to serve on (0.0.0.0: every interface)", flag_values=FLAGS)
flags.DEFINE_integer("port", 7860, "port to serve on", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype", flag_values=FLAGS)
flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: the backbone's linear layers with int8 "
                  "weights (weight-only; activations and the depth head in --dtype)", flag_values=FLAGS)
flags.DEFINE_string("out", None, "folder for the request files (default: a new temporary folder, deleted when the "
                    "demo stops)", flag_values=FLAGS)
flags.DEFINE_bool("share", False, "also serve on a public gradio.live link (Gradio's share)", flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> None:
  from depthvlm_jax import cli
  cli.parse_flags(FLAGS, argv, PROG, __doc__)
  args = FLAGS
  if args.out:
    cli.check_output_dir(args.out, "--out")
  try:
    import gradio  # noqa: F401
    import trimesh  # noqa: F401
  except ImportError as e:
    raise DemoError(f"the demo needs gradio and trimesh ({e}); install them with pip install -e '.[test]'") from None
  import jax.numpy as jnp
  from depthvlm_jax.evaluation.loading import load_model
  out_root = pathlib.Path(args.out or tempfile.mkdtemp(prefix="depthvlm_demo_")).absolute()
  out_root.mkdir(parents=True, exist_ok=True)
  # SIGTERM (a service stop, `kill`) ends the demo like Ctrl-C, so the temporary folder goes too.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
  try:
    model_path, note = choose_model(args.model, out_root)
    print(f"loading {model_path}", flush=True)
    predictor = Predictor(load_model(model_path, dtype=getattr(jnp, args.dtype), quantize=args.quantize), out_root)
    app = build_app(predictor, note, write_examples(out_root / "examples"))
    app.queue(default_concurrency_limit=1, max_size=32)
    print(f"serving on http://{args.host}:{args.port}" + ("" if args.share else " (--share also makes a public "
          "link)"), flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, inbrowser=False,
               allowed_paths=[str(out_root)], max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False, quiet=not args.share)
  finally:
    if not args.out:
      shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
  from depthvlm_jax import cli
  from depthvlm_jax.evaluation.loading import ModelLoadError
  from depthvlm_jax.model.hf_checkpoint import CheckpointError
  try:
    main()
  except (predict.PredictError, ModelLoadError, CheckpointError, DemoError, cli.UserError) as e:
    sys.exit(f"error: {e}")
