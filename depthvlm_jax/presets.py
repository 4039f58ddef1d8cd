"""Training settings: the paper's base config, the presets, and what each stage changes.

Presets (`python main.py --config=configs/stage1.py:PRESET`):
  default   tiny random-init Qwen3-VL + DPT head on the embedded synthetic RGB-D set; 2-core CPU, minutes.
  paper_4b  the paper's settings on Qwen3-VL-4B-Instruct read from `model.hf_dir` (bf16, remat).
  paper_8b  the same on Qwen3-VL-8B-Instruct.

A config is built as
  base_config() <- PRESETS[preset] <- the stage's common settings <- the stage's block for the preset,
then command-line `--config.x.y=v` overrides. Every block is a flat {dotted field: value} dict
applied to the locked base config, so a misspelt field is an error. `configs/stage1.py` and
`configs/stage2.py` are the files `--config=` names; they call `get_config` here, so the library
(the AOT sweep, the demo) builds the same configs without importing the top-level `configs` folder.
"""

from __future__ import annotations

import ml_collections

# {preset: {dotted config field: value}}: everything a preset changes in `base_config()`.
PRESETS = {
    "default": {
        "model.size": "tiny",
        # narrow DPT widths: the default run trains in minutes on a 2-core CPU
        "model.dpt_features": 32,
        "model.dpt_out_channels": (16, 32, 64, 64),
        "model.dpt_head_features": 16,
        "model.compute_dtype": "float32",
        "model.frozen_dtype": "float32",
        "model.remat": False,
        "model.scan_layers": False,
        # 3x4 image tokens; the synthetic scenes (1.1:1 to 1.65:1 landscape) all land in the first
        # bucket, so a default run compiles one train step
        "data.buckets": ((96, 128), (128, 96)),
        "data.seq_len": 128,
        "data.num_workers": 0,
        "data.prefetch_bytes": 2**30,
        "train.lm_positions": 40,
        "eval_per_device_batch": 8,  # the 48 held-out scenes in 6 batches on one CPU device
        "mesh.data": -1,
        "mesh.fsdp": 1,
    },
    # batch, micro-batches and mesh from the devices and the compiler (`train.per_device_rows`)
    "paper_4b": {"model.size": "4b", "train.per_device_rows": "auto"},
    "paper_8b": {"model.size": "8b", "train.per_device_rows": "auto"},
}

# {(model.size, stage): {chip: rows}}: rows per device per micro-batch a paper preset starts from on
# each accelerator. The `auto` search probes this first (a restart reads its cached choice instead), and
# the AOT report, which compiles for a slice it does not have, compiles these.
ROWS_PER_DEVICE = {
    ("4b", 1): {"v4": 16, "v5e": 4, "v5p": 40, "v6e": 16, "h100": 32},
    ("4b", 2): {"v4": 8, "v5e": 1, "v5p": 10, "v6e": 8, "h100": 20},
    ("8b", 1): {"v4": 8, "v5e": 4, "v5p": 40, "v6e": 8, "h100": 20},
    ("8b", 2): {"v4": 4, "v5e": 1, "v5p": 8, "v6e": 4, "h100": 8},
}


def parse_preset(arg):
  preset = arg or "default"
  if preset not in PRESETS:
    raise ValueError(f"unknown config preset {preset!r}; expected one of {tuple(PRESETS)}")
  return preset


def default_workdir(stage: int, preset: str) -> str:
  """Where `main.py` writes a run without `--workdir` (relative to the current directory)."""
  return f"runs/stage{stage}_{preset}"


# ---- stage 1: the depth head only (vision tower, LLM and LM head frozen), depth loss.
_STAGE1_COMMON = {
    "train.trainable": [("depth_head/.*", True), (".*", False)],
    "train.warmup_fraction": 0.04,
    "data.qa_weight": 0.0,
}

_STAGE1_PAPER = {"train.lr": 3.5e-4, "train.global_batch": 2560, "train.micro_batches": 8}
_STAGE1_PER_PRESET = {
    # 20 epochs over the 512 synthetic scenes (1280 steps); held-out δ1 every 320 steps.
    "default": {"train.lr": 2e-3, "train.global_batch": 8, "train.epochs": 20.0, "eval_every": 320},
    "paper_4b": _STAGE1_PAPER,
    "paper_8b": _STAGE1_PAPER,
}


# ---- stage 2: from the stage-1 run, LLM + LM head + depth head (vision frozen), depth + LM loss.
# The paper presets reproduce the authors' recipe: the same depth images with the fixed reply and no
# caption/QA data (`data.qa_weight` 0). The default preset mixes the synthetic set's caption/QA
# samples (half of each batch) as an extension; for real data give `data.qa_files` and
# `data.qa_weight`. The default preset starts from `runs/stage1_default` (stage 1's default
# workdir); set `--config.model_init=DIR` for a run written elsewhere, and for the paper presets
# (there "" starts a fresh head on `model.hf_dir`).
_STAGE2_COMMON = {
    "train.trainable": [("visual/.*", False), ("(language_model|lm_head)/.*", True), ("depth_head/.*", True)],
    "train.warmup_fraction": 0.05,
}

_STAGE1_DEFAULT_WORKDIR = default_workdir(1, "default")
# One micro-batch of 640 rows: each extra micro-batch gathers the FSDP-sharded weights again, and
# on a 64-chip slice 10 rows per chip fit (docs/measurements/tpu_aot.md). On fewer chips raise
# train.micro_batches. data.qa_weight stays 0: the fixed reply on the depth images only, as the authors.
_STAGE2_PAPER = {"train.lr": 2e-5, "train.global_batch": 640, "train.micro_batches": 1}
_STAGE2_PER_PRESET = {
    # 640 steps, half of each batch caption/QA samples. The tiny LLM starts from random init,
    # hence the high lr.
    "default": {"train.lr": 2e-3, "train.global_batch": 8, "train.total_steps": 640, "eval_every": 160,
                "data.qa_weight": 0.5,
                "model_init": _STAGE1_DEFAULT_WORKDIR,
                # the same synthetic set (and held-out split) as stage 1, not a second copy
                "data.synthetic_dir": f"{_STAGE1_DEFAULT_WORKDIR}/synthetic_data"},
    "paper_4b": _STAGE2_PAPER,
    "paper_8b": _STAGE2_PAPER,
}


STAGES = {1: (_STAGE1_COMMON, _STAGE1_PER_PRESET), 2: (_STAGE2_COMMON, _STAGE2_PER_PRESET)}


def get_config(stage: int, preset: str | None = None) -> ml_collections.ConfigDict:
  """base_config() <- PRESETS[preset] <- the stage's common block <- its block for the preset; locked."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {tuple(STAGES)}")
  preset = parse_preset(preset)
  common, per_preset = STAGES[stage]
  c = base_config(preset)
  c.stage = stage
  c.lock()  # a field that does not exist is an error, not a new field
  for values in (PRESETS[preset], common, per_preset[preset]):
    c.update_from_flattened_dict(values)
  return c


def base_config(preset):
  """The paper's settings (4B backbone); presets and stages override fields of it."""
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.stage = 0  # set by the stage file

  # ---- model
  c.model = ml_collections.ConfigDict()
  c.model.size = "4b"  # tiny | 4b | 8b
  # Qwen3-VL(-Instruct) or DepthVLM HF directory, or a hub id org/name[@revision]; "" = random init (tiny only)
  c.model.hf_dir = ""
  c.model.head_type = "dpt"  # dpt | mlp
  c.model.mlp_feature_mode = "llm_last"  # llm_last | concat | sum (mlp head only)
  # DPT widths: the official (256, (256, 512, 1024, 1024), 32); narrow for the CPU default.
  c.model.dpt_features = 256
  c.model.dpt_out_channels = (256, 512, 1024, 1024)
  c.model.dpt_head_features = 32
  c.model.compute_dtype = "bfloat16"
  c.model.param_dtype = "float32"
  # dtype of the parameters `train.trainable` freezes (stage 1: everything but the head). bfloat16
  # halves their HBM and FSDP gathers; with compute_dtype bfloat16 the forward reads the same
  # rounded values either way. float32 | bfloat16.
  c.model.frozen_dtype = "bfloat16"
  c.model.remat = True
  # what a rematerialised block keeps for the backward pass: a jax.checkpoint_policies name
  c.model.remat_policy = "nothing_saveable"
  # each tower's repeated blocks as one lax.scan: the compiler sees one block instead of 36 + 24
  # (the paper_4b step compiles in minutes instead of most of an hour); the tiny CPU model unrolls
  c.model.scan_layers = True
  # Attention kernel: auto = by the platform of the mesh's devices (the compile target, also for an
  # ahead-of-time compile from a CPU host): Pallas splash on TPU, cuDNN flash attention on NVIDIA
  # GPUs, the XLA form on the CPU. Or xla | splash | cudnn.
  c.model.attention_impl = "auto"

  # ---- initialisation / resumption (own workdir first, then `resume`, then `model_init`)
  c.model_init = ""  # checkpoint dir of a previous stage, or "" (fresh head on `model.hf_dir`)
  c.resume = ""

  # ---- data
  c.data = ml_collections.ConfigDict()
  c.data.kind = "synthetic"  # synthetic | jsonl
  c.data.synthetic_dir = ""  # "" = <workdir>/synthetic_data (generated on first use)
  c.data.synthetic_train = 512
  c.data.synthetic_test = 48
  c.data.synthetic_seed = 0
  c.data.train_files = ml_collections.ConfigDict()  # {name: "ann.jsonl|image_root|depth_root"}
  c.data.eval_files = ml_collections.ConfigDict()
  # The authors' train_datasets.conf (NAME_JSONL/_IMAGE/_DEPTH variables, read, not run): the names in
  # `datasets` ("" = its TRAIN_DATASETS) become train_files entries, relative paths from `datasets_root`
  # ("" = the current directory). Needs data.kind = "jsonl".
  c.data.datasets_conf = ""
  c.data.datasets = ""
  c.data.datasets_root = ""
  # Image buckets (H, W), multiples of 32: each sample is resized into the nearest in aspect ratio
  # and pixel count with its aspect kept, and padded (data_pipelines/pipeline.py). These cover the
  # canonical (fx = 1000) shapes of the training sets with little resizing: 4:3 landscape,
  # ScanNet++ (1342x1006 -> 1344x1024), Waymo (932x621 -> 960x640), DDAD (888x558 -> 896x576),
  # nuScenes (1264x711 -> 1248x704), Argoverse2 front-centre portrait (874x1155 -> 864x1152),
  # square (Taskonomy, HM3D centre crops).
  c.data.buckets = ((768, 1024), (1024, 1344), (640, 960), (576, 896), (704, 1248), (1152, 864), (1024, 1024))
  # Padded sequence length; 0 = each bucket's image tokens + `text_tokens` (768 + 128 = 896 for the
  # 768x1024 bucket, where a sample is a little shorter: a fixed long length would be mostly padding).
  c.data.seq_len = 0
  c.data.text_tokens = 128  # prompt + reply budget when seq_len = 0; longer samples are skipped as too_long
  # Mixing weight of each train source by name; a source not listed weighs its record count (the
  # authors concatenate the sets, so sampling follows their sizes).
  c.data.train_weights = ml_collections.ConfigDict()
  # Caption/QA sources for data.kind="jsonl": {name: "ann.jsonl|image_root"} (image + prompt + solution).
  c.data.qa_files = ml_collections.ConfigDict()
  c.data.qa_weight = 0.0  # fraction of caption/QA samples among all (stage 2; 0 = the paper's recipe)
  # Stop when a source skipped more than this fraction of its samples after min_samples drawn from it.
  c.data.max_skip_rate = 0.5
  c.data.skip_rate_min_samples = 1000
  c.data.num_workers = 16
  # Host memory the loader's examples may take (`pipeline.prefetch_plan`): read-ahead shrinks to fit,
  # and a run whose workers' batches alone exceed it stops at start-up. 16 workers assembling local
  # batches of 160 examples of the largest paper bucket need about 76e9 bytes before any read-ahead.
  c.data.prefetch_bytes = 96 * 2**30
  c.data.shuffle_seed = 0

  # ---- optimisation
  c.train = ml_collections.ConfigDict()
  c.train.global_batch = 8
  c.train.micro_batches = 1  # gradient accumulation steps per update
  # Rows one device takes per micro-batch: "0" = train.micro_batches and `mesh` as given; a number N
  # = at most N rows, the micro-batch count and the mesh derived from the devices at start-up; "auto"
  # = the largest rows whose compiled step stays within train.memory_fraction of the device memory
  # (searched by compiling ahead of time, cached in <workdir>/sizing.json). The global batch is kept.
  c.train.per_device_rows = "0"
  c.train.memory_fraction = 0.85  # of each device's memory the `auto` search may plan for
  # Per-device memory the sizing plans with, GiB; 0 = the device's own (the CPU reports none: set it there)
  c.train.memory_budget_gib = 0.0
  c.train.epochs = 1.0
  c.train.total_steps = 0  # 0 = from epochs
  c.train.lr = 1e-3
  c.train.warmup_fraction = 0.04
  c.train.grad_clip = 1.0
  c.train.weight_decay = 0.0
  c.train.depth_loss_weight = 1.0
  c.train.seed = 0
  c.train.max_nonfinite_steps = 5  # consecutive skipped updates before the run stops
  c.train.trainable = []  # [(regex over param path, trainable?)], first match wins
  # LoRA (`depthvlm_jax/model/lora.py`): rank 0 = full fine-tuning (the paper's recipe). With a rank
  # > 0 every linear layer whose module path `lora_targets` matches in full gets adapters A (in, rank)
  # and B (rank, out), added as alpha / rank * x A B; the LLM's own weights (language_model, lm_head)
  # are then frozen and the adapters train, with whatever else `trainable` trains (the depth head).
  c.train.lora_rank = 0
  c.train.lora_alpha = 16.0
  c.train.lora_targets = r"language_model/layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
  # LM head only on the first N supervised positions of each row (0 = every position). With the
  # 151936-token vocabulary, full logits would dominate a tiny model's step; a batch with a longer
  # reply is refused with an error naming this setting.
  # The paper presets' replies are the fixed 12-token sentence: 64 positions instead of logits of
  # (B, L, 151936) for every position.
  c.train.lm_positions = 64

  # ---- logging, evaluation, checkpoints
  c.log_every = 10  # metrics.jsonl + TensorBoard (workdir/tensorboard)
  c.eval_every = 0  # depth δ1 on the held-out split every N steps; 0 = only at the end
  # Held-out δ1 batch: rows per device of the mesh's batch axes (a forward only: small next to a
  # train micro-batch); the split is streamed and its last batch padded.
  c.eval_per_device_batch = 4
  c.eval_qa = 64  # held-out distance questions answered greedily at the end (synthetic data); 0 = off
  c.eval_qa_new_tokens = 12
  c.ckpt_every = 50
  c.keep_ckpts = 2

  # ---- devices
  # Persistent XLA compilation cache of `main.py` runs ("" = off): a restart loads its programs.
  c.compile_cache_dir = "~/.cache/depthvlm_jax/xla"
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  return c
