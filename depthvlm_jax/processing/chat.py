"""Qwen3-VL chat formatting with image placeholder expansion and assistant-only label masks.

A user turn is `<|im_start|>user\\n` + one `<|vision_start|><|image_pad|><|vision_end|>` per image +
the prompt + `<|im_end|>\\n`, then `<|im_start|>assistant\\n` (the Qwen3-VL-Instruct template, no
system prompt). Each `<|image_pad|>` becomes as many copies as the image has merged tokens
(grid_t*grid_h*grid_w / merge_size²). Labels are -100 everywhere except the assistant reply and its
closing `<|im_end|>`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE = -100
# The depth request of the DepthVLM training data, used when a record has no prompt of its own, and
# the stage-2 reply to it when a record has no solution.
DEFAULT_PROMPT = ("Given this image, estimate the metric depth (in meters, rounded to two decimal places) "
                  "for every pixel of the image.")
DEFAULT_REPLY = "OK, I will estimate the depth map of this image."


def format_user_turn(prompt: str, num_images: int) -> str:
  images = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
  return f"<|im_start|>user\n{images}{prompt}<|im_end|>\n<|im_start|>assistant\n"


def expand_image_pads(ids: Sequence[int], image_pad_id: int, num_image_tokens: Sequence[int]) -> list[int]:
  """Replaces the k-th `<|image_pad|>` by num_image_tokens[k] copies."""
  out, k = [], 0
  for t in ids:
    if t == image_pad_id:
      if k >= len(num_image_tokens):
        raise ValueError(f"text has more <|image_pad|> than the {len(num_image_tokens)} images given")
      out += [image_pad_id] * int(num_image_tokens[k])
      k += 1
    else:
      out.append(t)
  if k != len(num_image_tokens):
    raise ValueError(f"{len(num_image_tokens)} images given but the text has {k} <|image_pad|> placeholders")
  return out


def encode_sample(tokenizer, prompt: str, num_image_tokens: Sequence[int], answer: str | None = None):
  """Token ids (int32) and labels (int32, -100 = not supervised) of one user turn (+ reply).

  Args:
    tokenizer: a Qwen tokenizer (`processing.tokenizer.load_tokenizer`).
    prompt: user text (after the images).
    num_image_tokens: merged-token count of each image, in order.
    answer: assistant reply to supervise, or None for a generation prompt / depth-only sample.
  """
  pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
  end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
  user = tokenizer(format_user_turn(prompt, len(num_image_tokens)), add_special_tokens=False).input_ids
  ids = expand_image_pads(user, pad_id, num_image_tokens)
  labels = [IGNORE] * len(ids)
  if answer is not None:
    reply = tokenizer(answer, add_special_tokens=False).input_ids + [end_id]
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    ids += reply + newline
    labels += reply + [IGNORE] * len(newline)
  return {"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32)}
