"""Export DepthVLM parameters as a Hugging Face-layout directory that PyTorch loads.

  python -m depthvlm_jax.export --checkpoint WORKDIR_OR_HF_DIR --out DIR [--dtype bfloat16] [--max_shard_gb 5]

writes config.json (Qwen3-VL config + `depth_head_*` fields), model.safetensors (or shards plus
model.safetensors.index.json; each shard written as soon as it is full), the tokenizer files and preprocessor_config.json, with the official
key names: `transformers.Qwen3VLForConditionalGeneration.from_pretrained(DIR)` loads every backbone
weight, and `depthvlm_jax.torch_export.DepthVLMForConditionalGeneration` loads everything strictly.
The directory is written next to DIR and renamed into place when complete (readable by others, as
`umask` allows).

A DPT head with the official widths (`OFFICIAL_DPT`) is exported as the authors' checkpoint is laid
out: `architectures` = ["Qwen3VLForConditionalGeneration"] (their model class) and the released
`vision_config`. Other widths get architectures ["DepthVLMForConditionalGeneration"] and a warning:
the authors' code builds the head with fixed widths and cannot load them.

`--out` is never emptied blindly: an existing non-empty folder is replaced only when it is an
earlier export (it holds the `EXPORT_MARKER` file every export writes) or with `--overwrite`, and a
training workdir, a folder holding one, the `--checkpoint` source, the current directory, the home
directory and their parents are refused even then.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import sys
from typing import Any, Iterable, Iterator

from depthvlm_jax import cli

if __name__ == "__main__":
  cli.quiet_libraries(sys.argv[1:])  # environment settings, read when jax and transformers are imported

import numpy as np  # noqa: E402
from etils import epath  # noqa: E402
import safetensors.numpy
from absl import app, flags

from depthvlm_jax.model import hf_params
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig

EXPORT_MARKER = ".depthvlm_export.json"  # written into every export: marks a folder this tool may replace
MAX_ENTRIES_CHECKED = 100_000  # --overwrite: files looked at for a training workdir inside --out


class ExportError(ValueError):
  """A refused or failed export (message names --out and what was expected)."""


def _is_training_workdir(p: epath.Path) -> bool:
  return (p / "checkpoints").is_dir() or ((p / "config.json").is_file() and (p / "metrics.jsonl").is_file())


def _contains(parent: pathlib.Path, child: pathlib.Path) -> bool:
  return parent == child or parent in child.parents


def check_out_dir(out_dir: str | pathlib.Path, overwrite: bool = False,
                  sources: tuple[str | pathlib.Path, ...] = ()) -> pathlib.Path:
  """Refuses an `--out` whose contents an export would destroy; returns it resolved.

  Accepted: a missing or empty folder, an earlier export (holds `EXPORT_MARKER`), or with
  `overwrite` any other folder, except one that is or holds a training workdir, holds one of
  `sources` (the model being exported), or is the current or home directory or one of their parents.
  """
  flag = f"--out={out_dir}"
  if "://" in str(out_dir):  # an object-store prefix: no folders to protect, only earlier contents
    remote = epath.Path(out_dir)
    if remote.exists() and any(remote.iterdir()) and not (remote / EXPORT_MARKER).exists() and not overwrite:
      raise ExportError(f"{flag}: holds objects and is not an earlier export (no {EXPORT_MARKER}); give a new "
                        "or empty prefix, or pass --overwrite to replace its contents")
    if _is_training_workdir(remote):
      raise ExportError(f"{flag}: is a training workdir (checkpoints/ or config.json + metrics.jsonl); "
                        "exporting there would delete the run; give a new or empty prefix")
    return remote
  out = pathlib.Path(out_dir).expanduser().resolve()
  if out.exists() and not out.is_dir():
    raise ExportError(f"{flag}: exists and is not a directory; give a new or empty folder")
  if not out.exists() or not any(out.iterdir()):
    return out
  for src in sources:
    if _contains(out, pathlib.Path(src).expanduser().resolve()):
      raise ExportError(f"{flag}: holds the model being exported ({src}); give a new or empty folder")
  for protected, what in ((pathlib.Path.cwd().resolve(), "the current directory"),
                          (pathlib.Path.home().resolve(), "the home directory")):
    if _contains(out, protected):
      raise ExportError(f"{flag}: is {what} or one of its parents; give a new or empty folder")
  if _is_training_workdir(out):
    raise ExportError(f"{flag}: is a training workdir (checkpoints/ or config.json + metrics.jsonl); "
                      "exporting there would delete the run; give a new or empty folder")
  if (out / EXPORT_MARKER).is_file():
    return out
  if not overwrite:
    raise ExportError(f"{flag}: folder is not empty and is not an earlier export (no {EXPORT_MARKER}); give a "
                      "new or empty folder, or pass --overwrite to replace its contents")
  seen = 0
  for root, dirs, files in os.walk(out):
    seen += len(dirs) + len(files)
    if _is_training_workdir(pathlib.Path(root)):
      raise ExportError(f"{flag}: holds a training workdir ({root}); --overwrite never deletes one; give a new "
                        "or empty folder")
    if seen > MAX_ENTRIES_CHECKED:
      raise ExportError(f"{flag}: holds over {MAX_ENTRIES_CHECKED} files and folders; refusing to replace it; "
                        "give a new or empty folder")
  return out


def hf_tensors(params: dict[str, Any], config: Qwen3VLConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(official key, torch-layout array) for the backbone and, if present, the depth head."""
  yield from hf_params.params_to_hf(params, config)


# The widths the authors' DPT head is built with: features, out_channels, head_features.
OFFICIAL_DPT = (256, (256, 512, 1024, 1024), 32)


def is_official_head(head: DepthHeadConfig) -> bool:
  """Whether the authors' code can load this head (a DPT head with the official widths)."""
  return head.head_type == "dpt" and (head.features, tuple(head.out_channels), head.head_features) == OFFICIAL_DPT


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    import ml_dtypes
    return np.asarray(a, dtype=ml_dtypes.bfloat16)
  return np.asarray(a, dtype=np.float32)


def write_hf_dir(params: dict[str, Any], config: Qwen3VLConfig, head: DepthHeadConfig | None, out_dir: str | pathlib.Path,
                 tokenizer=None, processor=None, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
                 processing_files: bool = True, overwrite: bool = False,
                 sources: tuple[str | pathlib.Path, ...] = ()) -> pathlib.Path:
  """Writes the HF directory of `params` atomically (an existing `out_dir` is accepted as in `check_out_dir`).

  Args:
    overwrite, sources: see `check_out_dir`.
    tokenizer, processor: a Hugging Face tokenizer and an `ImageProcessorConfig` whose files are
      written beside the weights (defaults: the embedded offline Qwen tokenizer and default
      processor settings); skipped when `processing_files=False`.
  """
  return write_hf_tensors(hf_tensors(params, config), config, head, out_dir, tokenizer, processor, dtype,
                          max_shard_bytes, processing_files, overwrite, sources)


def write_hf_tensors(tensors: Iterable[tuple[str, np.ndarray]], config: Qwen3VLConfig, head: DepthHeadConfig | None,
                     out_dir: str | pathlib.Path, tokenizer=None, processor=None, dtype: str = "float32",
                     max_shard_bytes: int = 5 * 2**30, processing_files: bool = True, overwrite: bool = False,
                     sources: tuple[str | pathlib.Path, ...] = ()) -> pathlib.Path:
  """`write_hf_dir` for a stream of (official key, torch-layout array) pairs.

  Streamed: each shard file is written as soon as it is full and its arrays dropped, so besides the
  source of the tensors at most one shard (`max_shard_bytes`) is held.
  """
  out = check_out_dir(out_dir, overwrite, sources)
  if "://" in str(out_dir):  # written locally, then uploaded file by file; the marker goes last
    with tempfile.TemporaryDirectory() as d:
      local = write_hf_tensors(tensors, config, head, pathlib.Path(d) / "export", tokenizer, processor, dtype,
                               max_shard_bytes, processing_files)
      files = sorted(local.iterdir(), key=lambda f: f.name == EXPORT_MARKER)
      if out.exists():
        for stale in out.iterdir():  # a previous export's files, e.g. shards of another count
          if stale.name not in {f.name for f in files}:
            stale.unlink()
      for f in files:
        with f.open("rb") as src, (out / f.name).open("wb") as dst:
          shutil.copyfileobj(src, dst)
    return out
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  except OSError as e:
    raise ExportError(f"--out={out_dir}: cannot create it ({e.strerror or e})") from None
  try:
    cfg = config.to_hf_dict()
    cfg["torch_dtype"] = dtype
    if head is not None:
      cfg.update(head.to_hf_dict())
      if not is_official_head(head):
        logging.warning("exporting a %s depth head with widths features=%d, out_channels=%s, head_features=%d: "
                        "the authors' code builds DPT heads with %s and cannot load it (depthvlm_jax and "
                        "depthvlm_jax.torch_export can)", head.head_type, head.features, list(head.out_channels),
                        head.head_features, OFFICIAL_DPT)
        cfg["architectures"] = ["DepthVLMForConditionalGeneration"]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    # Shards are written under part names as they fill; the final names need their count.
    parts: list[list[str]] = []  # keys of each written part
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
      safetensors.numpy.save_file(shard, str(tmp / f"part-{len(parts):05d}.safetensors"), metadata={"format": "pt"})
      parts.append(list(shard))
      shard.clear()

    for key, value in tensors:
      arr = np.ascontiguousarray(_cast(value, dtype))
      del value
      if shard and size + arr.nbytes > max_shard_bytes:
        flush()
        size = 0
      shard[key] = arr
      size += arr.nbytes
      total += arr.nbytes
      del arr
    if shard or not parts:
      flush()
    if len(parts) == 1:
      os.replace(tmp / "part-00000.safetensors", tmp / "model.safetensors")
    else:
      weight_map = {}
      for i, keys in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(tmp / f"part-{i:05d}.safetensors", tmp / name)
        weight_map.update({k: name for k in keys})
      (tmp / "model.safetensors.index.json").write_text(
          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if processing_files:
      from depthvlm_jax.processing.image_processor import ImageProcessorConfig
      from depthvlm_jax.processing.tokenizer import load_tokenizer
      (tokenizer or load_tokenizer(None)).save_pretrained(str(tmp))
      (processor or ImageProcessorConfig()).save(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    for f in tmp.iterdir():  # the safetensors writer makes its files private too
      os.chmod(f, 0o666 & ~umask)
    (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "depthvlm_jax.export", "dtype": dtype}))
    old = None
    if out.exists():  # the previous contents move aside and go only once the new export is in place
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
      os.replace(out, old / "previous")
    try:
      os.replace(tmp, out)
    except BaseException:
      if old is not None:
        os.replace(old / "previous", out)
      raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise ExportError(f"--out={out_dir}: export failed, {out} unchanged ({e.strerror or type(e).__name__})") from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training workdir (orbax checkpoints + config.json) or a "
                                   "Hugging Face-layout DepthVLM directory or hub id org/name[@revision] "
                                   "(to re-shard or cast it).")
_OUT = flags.DEFINE_string("out", None, "Output directory (Hugging Face layout).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored dtype.")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Shard safetensors above this size.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out that is not an earlier export "
                               "(never a training workdir, a folder holding one, or the --checkpoint source).")


def main(argv):
  del argv
  if flags.FLAGS.verbosity < 1:
    cli.quiet_library_loggers()  # absl's app.run set its logger from --verbosity
  with cli.user_errors(flags.FLAGS.verbosity, extra=(ExportError,)):
    if not _MAX_SHARD_GB.value > 0:
      raise ExportError(f"--max_shard_gb={_MAX_SHARD_GB.value}: expected a positive size in GB")
    check_out_dir(_OUT.value, _OVERWRITE.value, (_CHECKPOINT.value,))  # before the (slow) model load
    cli.check_output_dir(_OUT.value, "--out")
    import jax.numpy as jnp
    from depthvlm_jax.evaluation.loading import load_model
    # A HF directory is read straight in the stored dtype (a bfloat16 export never holds float32 weights).
    loaded = load_model(_CHECKPOINT.value, dtype=jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32)
    out = write_hf_dir(loaded.params, loaded.model.config, loaded.model.head, _OUT.value, loaded.tokenizer,
                       loaded.processor, _DTYPE.value, int(_MAX_SHARD_GB.value * 2**30), overwrite=_OVERWRITE.value,
                       sources=(_CHECKPOINT.value,))
  print(f"wrote {out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "out"])
  app.run(main)
