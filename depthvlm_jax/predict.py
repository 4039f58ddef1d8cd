"""Depth maps, point clouds and text answers for images.

  python -m depthvlm_jax.predict --model DIR_OR_CKPT --image PATH [--fx F] [--prompt TEXT] --out DIR

PATH is an image, a folder (every .jpg/.jpeg/.png/.bmp/.webp/.tif in it, sorted) or a list file
(.txt/.lst: one image per line, optionally followed by its fx; relative paths are relative to the list
file); PATH, the list's entries and DIR may be on an object store (gs://...). For an image `NAME` it writes into DIR:
  NAME_depth.npy   (H, W) float32 metres at the original resolution
  NAME_depth.png   (H, W) uint16 millimetres (0 = invalid)
  NAME_vis.png     (H, 2W, 3) RGB | Turbo depth (2nd-98th percentile range)
  NAME.ply         binary PLY point cloud (x, y, z float32 metres; red, green, blue uint8)
  NAME.json        the answer text, intrinsics, sizes and depth statistics
and `predictions.jsonl` with one summary line per image. Each file is written under a temporary
name and renamed when complete, and an image's line is added only once its files are all in
place, so a killed run leaves complete outputs only. An image that cannot be used (unreadable, below
`--min_side` pixels on a side, above `--max_megapixels`) is reported and skipped; the others are still
written, and the exit status is 1 if any image failed.

Camera: `--fx` is the focal length in pixels of the image as given; fy = fx and the principal point is
the image centre. Without it, fx = DEFAULT_FX_FRACTION * width (a 60° horizontal field of view,
typical of phone and webcam cameras; metric depth scales with this guess). The image is resized so
its focal length becomes `canonical_fx` (1000 px, as in training), then to the processor's multiple
of 32 (`--preprocess official`: first to qwen-vl-utils' multiple of 28, as the authors' evaluation
feeds the released checkpoint; see `processing.image_processor`); the model's depth map is resized
back to the original size (bilinear, align_corners=True).

Depth and text come from one prefill: `generate.generate_tokens(..., depth_grid=...)` runs the
DepthVLM forward once over image + prompt, returns its depth map, and decodes the answer from the
KV cache that same pass filled.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pathlib
import sys
import tempfile
from typing import Any, Sequence

from depthvlm_jax import cli

if __name__ == "__main__":
  cli.quiet_libraries(sys.argv[1:])  # environment settings, read when jax and transformers are imported

import jax  # noqa: E402
import numpy as np
from absl import flags
from etils import epath
from PIL import Image

from data_pipelines import rgbd
from depthvlm_jax import generate as gen
from depthvlm_jax.evaluation import outputs, protocol
from depthvlm_jax.model.inputs import make_model_inputs
from depthvlm_jax.processing import chat
from depthvlm_jax.processing.image_processor import PREPROCESSING, preprocess_image, processed_size

CANONICAL_FX = 1000.0
DEFAULT_FX_FRACTION = 0.5 / math.tan(math.radians(30.0))  # fx / width for a 60° horizontal FoV
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MIN_SIDE = 32  # pixels: the model's patch-merge unit; smaller images carry no usable depth
# Point clouds above this many points keep every s-th row and column (about 30 MB of PLY at most).
MAX_PLY_POINTS = 2_000_000
MAX_MEGAPIXELS = 100.0  # default input cap (about 2 GB of host memory at 20 bytes per pixel)


class PredictError(ValueError):
  """Bad input (message names the file or option and what was expected)."""


def default_fx(width: int) -> float:
  return DEFAULT_FX_FRACTION * width


def check_fx(fx: float | None, where: str = "--fx") -> float | None:
  """`fx` unchanged if None or a positive finite number; else PredictError naming `where`."""
  if fx is not None and not (math.isfinite(fx) and fx > 0):
    raise PredictError(f"{where}={fx!r}: expected a positive focal length in pixels (omit it for a 60 degree "
                       "field of view)")
  return fx


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: float | None):
  """PIL's decompression-bomb limit set to `max_pixels` (None: off) for the body; our cap replaces it."""
  saved = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = None if max_pixels is None else int(max_pixels)
  try:
    yield
  finally:
    Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | pathlib.Path, max_megapixels: float | None = MAX_MEGAPIXELS,
               min_side: int = MIN_SIDE) -> np.ndarray:
  """(H, W, 3) uint8 RGB of an image file, refusing (PredictError) sizes outside the limits.

  The size is read from the file header first, so an oversized image is refused before decoding.
  """
  path = epath.Path(path)
  max_pixels = None if max_megapixels is None else max_megapixels * 1e6
  try:
    with _pil_pixel_limit(None), path.open("rb") as f, Image.open(f) as im:  # decodes the header only
      w, h = im.size
  except FileNotFoundError:
    raise PredictError(f"{path}: image file not found") from None
  except Exception as e:  # any decoder failure
    raise PredictError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
  if max_pixels is not None and w * h > max_pixels:
    raise PredictError(f"{path}: {w}x{h} = {w * h / 1e6:.1f} megapixels exceeds --max_megapixels="
                       f"{max_megapixels:g}; downscale the image or raise --max_megapixels")
  _check_min_side(path, w, h, min_side)
  try:
    with _pil_pixel_limit(max(w * h, 1)):  # this size passed our cap; PIL's own limit would refuse ~179 MP
      return rgbd.load_rgb(path)
  except rgbd.SampleError as e:
    raise PredictError(str(e)) from None


def _check_min_side(name: Any, w: int, h: int, min_side: int) -> None:
  if min(w, h) < min_side:
    raise PredictError(f"{name}: {w}x{h} pixels; expected at least {min_side} pixels on each side (smaller "
                       f"images would be upscaled many times over; see --min_side)")


def list_images(path: str | pathlib.Path, fx: float | None = None) -> list[tuple[epath.Path, float | None]]:
  """(image path, fx or None) for an image, a folder of images, or a list file ("path [fx]" lines);
  local or object-store paths (gs://...)."""
  p = epath.Path(path)
  if p.is_dir():
    found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
      raise PredictError(f"{p}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(q, fx) for q in found]
  if not p.exists():
    raise PredictError(f"{p}: no such image, folder or list file")
  if p.suffix.lower() in (".txt", ".lst"):
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
      parts = line.split()
      if not parts or parts[0].startswith("#"):
        continue
      q = epath.Path(parts[0])
      q = q if q.is_absolute() else p.parent / q  # gs://... is absolute
      try:
        f = float(parts[1]) if len(parts) > 1 else fx
      except ValueError:
        raise PredictError(f"{p}:{n}: expected 'path [fx]', got {line!r}") from None
      check_fx(f, f"{p}:{n}: fx")
      if not q.exists():
        raise PredictError(f"{p}:{n}: image {q} not found")
      out.append((q, f))
    return out
  return [(p, fx)]


def predict_image(loaded, image: str | os.PathLike | np.ndarray, fx: float | None = None,
                  prompt: str | None = None, out_dir: str | pathlib.Path | None = None, name: str | None = None,
                  max_new_tokens: int = 64, seq_multiple: int = 64, preprocessing: str = "direct",
                  max_megapixels: float | None = MAX_MEGAPIXELS, min_side: int = MIN_SIDE,
                  return_points: bool = True) -> dict[str, Any]:
  """Depth (metres, original resolution), point cloud and text answer for one image.

  Args:
    loaded: `evaluation.loading.load_model(...)` result.
    image: a path or an (H, W, 3) uint8 RGB array.
    fx: focal length in pixels of this image (default `default_fx(W)`).
    prompt: user prompt (default: the DepthVLM depth prompt).
    out_dir: when given, the files listed in the module docstring are written there.
    name: file stem (default: the image file's stem, or "image").
    max_new_tokens: length of the greedy answer.
    seq_multiple: prompt length is padded to a multiple of this (fewer recompiles across sizes).
    preprocessing: "direct" (one resize to multiples of 32) or "official" (28-then-32, the authors'
      evaluation input).
    max_megapixels, min_side: images outside these limits are refused with PredictError
      (`max_megapixels=None`: no cap).
    return_points: include `points`/`colours` (N, 3) in the result (15 bytes per pixel; the PLY file
      is written either way, in row chunks).

  Returns:
    dict with depth (H, W) float32, text, fx, intrinsics (3, 3), canonical_size / processed_size
    (H, W), points (N, 3) float32, colours (N, 3) uint8, and files {kind: path} when written.
  """
  check_fx(fx, "fx")
  if isinstance(image, (str, os.PathLike)):
    rgb = load_image(image, max_megapixels, min_side)
    name = name or epath.Path(image).stem
  else:
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
      raise PredictError(f"image array of shape {rgb.shape} and dtype {rgb.dtype}: expected (H, W, 3) uint8")
    name = name or "image"
    _check_min_side("image array", rgb.shape[1], rgb.shape[0], min_side)
  h0, w0 = rgb.shape[:2]
  fx = float(fx) if fx is not None else default_fx(w0)
  model, params, tok, proc = loaded.model, loaded.params, loaded.tokenizer, loaded.processor
  cw, ch = rgbd.canonical_size((w0, h0), fx, CANONICAL_FX)
  canonical = np.asarray(Image.fromarray(rgb).resize((cw, ch), Image.Resampling.BILINEAR))
  hp, wp = processed_size(ch, cw, proc, preprocessing)
  patches, grid = preprocess_image(canonical, proc, size=(hp, wp), preprocessing=preprocessing)
  grid_tokens = (hp // proc.factor, wp // proc.factor)
  ids = chat.encode_sample(tok, prompt or chat.DEFAULT_PROMPT, [grid_tokens[0] * grid_tokens[1]])["input_ids"]
  seq_len = -(-len(ids) // seq_multiple) * seq_multiple
  batch = make_model_inputs([ids], model.config, [patches], [grid[1:]], padding_side="left", seq_len=seq_len,
                            pad_id=tok.pad_token_id)
  eos = tuple(i for i in (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
              if i is not None)
  sampling = gen.SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=tok.pad_token_id)
  tokens, prefill = gen.generate_tokens(model, params, batch["input_ids"], batch["attention_mask"],
                                        batch["position_ids"], jax.random.key(0), batch["pixel_values"],
                                        batch["image_grid_hw"], sampling=sampling, depth_grid=grid_tokens)
  text = tok.decode(gen.strip_after_eos(np.asarray(tokens), eos)[0], skip_special_tokens=True)
  depth = protocol.resize_map(np.asarray(prefill.depth[0], np.float32), (h0, w0))
  k = outputs.intrinsics(w0, h0, fx)
  result = dict(name=name, depth=depth, text=text, fx=fx, intrinsics=k, original_size=(h0, w0),
                canonical_size=(ch, cw), processed_size=(hp, wp))
  if return_points:
    result["points"], result["colours"] = outputs.backproject(depth, k, rgb)
  if out_dir is not None:
    result["files"] = write_outputs(out_dir, name, rgb, result)
  return result


@contextlib.contextmanager
def _atomic(path: epath.Path):
  """Yields a temporary local path (same suffix) that replaces `path` when the body succeeds.

  Beside `path` for a local one (then renamed); for an object-store path a local temporary file,
  uploaded as one object (an object appears whole or not at all).
  """
  if "://" in str(path):
    with tempfile.TemporaryDirectory() as d:
      tmp = pathlib.Path(d) / f"out{path.suffix}"
      yield tmp
      path.write_bytes(tmp.read_bytes())
    return
  tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_outputs(out_dir: str | pathlib.Path, name: str, rgb: np.ndarray, result: dict[str, Any],
                  max_ply_points: int = MAX_PLY_POINTS) -> dict[str, str]:
  """Writes NAME_depth.npy/.png, NAME_vis.png, NAME.ply, NAME.json (each atomically); returns {kind: path}.

  The point cloud keeps every pixel up to `max_ply_points` points; a larger image keeps every s-th
  row and column (`outputs.point_stride`; the depth files keep every pixel).

  The per-pixel outputs are produced in row chunks: beyond `rgb` and `depth`, memory stays near one
  RGB image of twice the width (the visualisation being encoded).
  """
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  depth = result["depth"]
  files = {"npy": out / f"{name}_depth.npy", "png": out / f"{name}_depth.png", "vis": out / f"{name}_vis.png",
           "ply": out / f"{name}.ply", "json": out / f"{name}.json"}
  with _atomic(files["npy"]) as tmp:
    np.save(tmp, depth)
  with _atomic(files["png"]) as tmp:
    outputs.save_depth_png_mm(tmp, depth)
  lo, hi = outputs.percentile_range(depth)
  with _atomic(files["vis"]) as tmp:
    outputs.save_side_by_side(tmp, rgb, depth, (lo, hi))
  with _atomic(files["ply"]) as tmp:
    n_points = outputs.write_ply_from_depth(tmp, depth, result["intrinsics"], rgb, max_ply_points)
  info = {"name": name, "text": result["text"], "fx": result["fx"], "intrinsics": result["intrinsics"].tolist(),
          "original_size": list(result["original_size"]), "canonical_size": list(result["canonical_size"]),
          "processed_size": list(result["processed_size"]), "points": int(n_points),
          "depth_min": float(depth.min()), "depth_max": float(depth.max()), "depth_p2": lo, "depth_p98": hi,
          "files": {k: str(v) for k, v in files.items()}}
  with _atomic(files["json"]) as tmp:
    tmp.write_text(json.dumps(info, indent=2))
  return {k: str(v) for k, v in files.items()}


@contextlib.contextmanager
def _appender(path: epath.Path):
  """A text file opened for appending; on an object store (no appends) the object is rewritten whole
  (earlier lines kept) at every flush."""
  if "://" not in str(path):
    with path.open("a") as f:
      yield f
    return
  class Rewriter(io.StringIO):
    def flush(self):
      path.write_text(self.getvalue())

  buf = Rewriter()
  buf.write(path.read_text() if path.exists() else "")
  yield buf
  buf.flush()


def predict_many(loaded, images: Sequence[tuple[str | os.PathLike, float | None]], out_dir: str | pathlib.Path,
                 prompt: str | None = None, max_new_tokens: int = 64, progress: bool = True,
                 preprocessing: str = "direct", max_megapixels: float | None = MAX_MEGAPIXELS,
                 min_side: int = MIN_SIDE) -> list[dict[str, Any]]:
  """`predict_image` over (path, fx) pairs; appends a summary line per image to predictions.jsonl.

  An image that fails (PredictError: unreadable, too small, too large) is logged and skipped; its
  row has `error` (the message) instead of `text` and `files`, and is not written to predictions.jsonl.
  """
  import logging

  import tqdm
  out = epath.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise PredictError(f"--out={out}: exists and is not a directory")
  out.mkdir(parents=True, exist_ok=True)
  names = [epath.Path(p).stem for p, _ in images]
  if len(set(names)) != len(names):  # same stem in different folders: keep files apart
    names = [f"{i:05d}_{n}" for i, n in enumerate(names)]
  summaries = []
  with _appender(out / "predictions.jsonl") as f:
    for (path, fx), name in tqdm.tqdm(list(zip(images, names)), desc="predict", disable=not progress):
      try:
        r = predict_image(loaded, path, fx, prompt, out, name, max_new_tokens, preprocessing=preprocessing,
                          max_megapixels=max_megapixels, min_side=min_side, return_points=False)
      except PredictError as e:
        logging.warning("skipping image: %s", e)
        summaries.append({"image": str(path), "name": name, "error": str(e)})
        continue
      row = {"image": str(path), "name": name, "text": r["text"], "fx": r["fx"], "files": r["files"]}
      f.write(json.dumps(row) + "\n")
      f.flush()
      summaries.append(row)
  return summaries


PROG = "python -m depthvlm_jax.predict"
# The command's own flags (not absl's global FLAGS): `main(argv)` runs in-process too, beside other CLIs.
FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "HF-layout DepthVLM/Qwen3-VL directory, hub id org/name[@revision], or a "
                    "training workdir", flag_values=FLAGS)
flags.DEFINE_string("image", None, "image, folder of images, or list file (.txt/.lst)", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory", flag_values=FLAGS)
flags.DEFINE_float("fx", None, "focal length in pixels (default: 60° horizontal FoV)", flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "user prompt (default: the DepthVLM depth prompt)", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "length of the greedy answer", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype", flag_values=FLAGS)
flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: the backbone's linear layers with int8 "
                  "weights (weight-only; activations and the depth head in --dtype)", flag_values=FLAGS)
flags.DEFINE_enum("preprocess", "direct", PREPROCESSING, "official: resize as the authors' evaluation does "
                  "(28-then-32 multiples)", flag_values=FLAGS)
flags.DEFINE_float("max_megapixels", MAX_MEGAPIXELS, f"refuse larger images (default {MAX_MEGAPIXELS:g}; host memory "
                   "is about 20 bytes per pixel)", flag_values=FLAGS)
flags.DEFINE_integer("min_side", MIN_SIDE, f"refuse images with a side shorter than this many pixels (default "
                     f"{MIN_SIDE})", flag_values=FLAGS)
flags.DEFINE_integer("verbosity", 0, "1: print the traceback of an error too, and library logs", flag_values=FLAGS)
flags.mark_flags_as_required(["model", "image", "out"], flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Predicts for the command-line flags `argv` (default: sys.argv[1:]); returns the per-image rows."""
  cli.parse_flags(FLAGS, argv, PROG, __doc__)
  args = FLAGS
  with cli.user_errors(args.verbosity, extra=(PredictError,)):
    check_fx(args.fx)
    if not args.max_megapixels > 0:
      raise PredictError(f"--max_megapixels={args.max_megapixels}: expected a positive number")
    if args.min_side < 1:
      raise PredictError(f"--min_side={args.min_side}: expected a positive number of pixels")
    if args.max_new_tokens < 1:
      raise PredictError(f"--max_new_tokens={args.max_new_tokens}: expected a positive number")
    import jax.numpy as jnp
    from depthvlm_jax.evaluation.loading import load_model
    images = list_images(args.image, args.fx)
    cli.check_output_dir(args.out, "--out")
    loaded = load_model(args.model, dtype=getattr(jnp, args.dtype), quantize=args.quantize)
    rows = predict_many(loaded, images, args.out, args.prompt, args.max_new_tokens, preprocessing=args.preprocess,
                        max_megapixels=args.max_megapixels, min_side=args.min_side)
  failed = [r for r in rows if "error" in r]
  for r in rows:
    if "error" not in r:
      print(f"{r['image']}: {r['text']!r} -> {r['files']['vis']}")
  if failed:
    for r in failed:
      sys.stderr.write(f"error: {cli.one_line(PredictError(r['error']))}\n")
    sys.stderr.write(f"error: {len(failed)} of {len(rows)} images failed (listed above); the others were written "
                     f"to {args.out}\n")
    raise SystemExit(1)
  return rows


if __name__ == "__main__":
  main()
