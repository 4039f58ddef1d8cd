"""Spoken-distance evaluation: greedy answers to held-out "How far is the X?" questions, scored in metres.

The synthetic QA records (data_pipelines/synthetic.py) ask "How far is the <object> from the camera, in
meters?" with the reply "About <d> meters." where d is the median z-depth of the object's visible
pixels. Each question is asked with its image (same bucket and centre crop as the depth evaluation),
answered greedily with `generate.generate_tokens`, and the first number in the answer is parsed.

Scores: `parse_rate` (fraction of answers containing a number), `mae_m` (mean |parsed - true| over
parsed answers) and two references that need no image: `constant_mae_m` (the same error for the
median training distance, the best constant under absolute error) and `class_prior_mae_m` (for the
median training distance of the object's class, e.g. every "car": what reading the question alone
can reach, since cars stand in streets and tables in rooms). Only a model that beats the class prior
reads distances from the image.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np

from data_pipelines import pipeline, rgbd
from depthvlm_jax import generate as gen
from depthvlm_jax.model.inputs import make_model_inputs
from depthvlm_jax.processing.device_patches import host_patches

QUESTION = re.compile(r"^How far is the (?P<object>.+) from the camera, in meters\?$")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_metres(text: str) -> float | None:
  """First decimal number in `text`, or None."""
  m = NUMBER.search(text)
  return float(m.group()) if m else None


def object_class(question: str) -> str:
  """The class of the object a distance question names: its last word ("the red car" -> "car")."""
  return QUESTION.match(question)["object"].split()[-1]


def distance_questions(jsonl: str, limit: int) -> list[tuple[Any, float]]:
  """(record, true distance in m) of the first `limit` distance questions of a QA annotation file."""
  records, _ = rgbd.read_jsonl(jsonl)
  out = []
  for r in records:
    if r.prompt and QUESTION.match(r.prompt) and r.solution and parse_metres(r.solution) is not None:
      out.append((r, parse_metres(r.solution)))
  return out[:limit]


def score(predicted: Sequence[float | None], truth: Sequence[float], constant: float,
          class_prior: Sequence[float]) -> dict[str, float | None]:
  """n, parse_rate, mae_m (over parsed answers; None if none parsed), constant_mae_m and
  class_prior_mae_m (`class_prior`: the class-prior answer of every question)."""
  pairs = [(p, t) for p, t in zip(predicted, truth) if p is not None]
  out = {"n": len(truth), "parse_rate": len(pairs) / max(len(truth), 1),
         "mae_m": float(np.mean([abs(p - t) for p, t in pairs])) if pairs else None,
         "constant_mae_m": float(np.mean([abs(constant - t) for t in truth])) if truth else None}
  if len(class_prior) != len(truth):
    raise ValueError(f"class_prior has {len(class_prior)} answers for {len(truth)} questions")
  out["class_prior_mae_m"] = float(np.mean([abs(p - t) for p, t in zip(class_prior, truth)])) if truth else None
  return out


def evaluate_distance_qa(model, params, qa_source: pipeline.SourceSpec, specs: Sequence[pipeline.ExampleSpec],
                         tokenizer, processor, train_qa_jsonl: str, limit: int,
                         batch_size: int, max_new_tokens: int) -> dict[str, Any]:
  """Greedy answers of `model` to up to `limit` held-out distance questions, scored (see module doc).

  Each image is prepared in its nearest bucket of `specs` (prompt only, no reply).

  Returns the `score` dict plus `examples`: a few (question, answer, truth) triples.
  """
  questions = distance_questions(qa_source.jsonl, limit)
  if not questions:
    raise ValueError(f"{qa_source.jsonl}: no 'How far is the ... in meters?' questions to evaluate")
  train = distance_questions(train_qa_jsonl, 10**9)
  constant = float(np.median([d for _, d in train] or [0.0]))
  by_class = collections.defaultdict(list)
  for r, d in train:
    by_class[object_class(r.prompt)].append(d)
  class_median = {c: float(np.median(v)) for c, v in by_class.items()}
  specs = [dataclasses.replace(s, with_answer=False) for s in specs]
  seq_len = max(s.seq_len for s in specs)
  prepare = pipeline.PrepareExample(qa_source, specs, model.config, tokenizer, processor)
  eos = tuple(i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"),
                          tokenizer.convert_tokens_to_ids("<|endoftext|>")) if i is not None)
  sampling = gen.SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id)
  examples = [(prepare(r), r, d) for r, d in questions]
  examples = [(e, r, d) for e, r, d in examples if isinstance(e, dict)]
  answers: list[str] = []
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one program for every batch
    ids = [e["input_ids"][:int(e["attention_mask"].sum())] for e, _, _ in chunk]
    # each image's own patches (the bucket's padding slots dropped; the batch pads to its largest)
    b = make_model_inputs(ids, model.config, [host_patches(e["pixels"], e["image_grid_hw"], processor)
                                              [:int(np.prod(e["image_grid_hw"]))] for e, _, _ in chunk],
                          [tuple(e["image_grid_hw"]) for e, _, _ in chunk], padding_side="left", seq_len=seq_len,
                          pad_id=tokenizer.pad_token_id)
    tokens, _ = gen.generate_tokens(model, params, b["input_ids"], b["attention_mask"], b["position_ids"],
                                    jax.random.key(0), b["pixel_values"], b["image_grid_hw"], sampling=sampling)
    rows = gen.strip_after_eos(np.asarray(tokens), eos)
    answers += [tokenizer.decode(t, skip_special_tokens=True) for t in rows[:min(batch_size, len(examples) - i)]]
  truth = [d for _, _, d in examples]
  class_prior = [class_median.get(object_class(r.prompt), constant) for _, r, _ in examples]
  out = score([parse_metres(a) for a in answers], truth, constant, class_prior)
  out["examples"] = [{"question": r.prompt, "answer": a, "truth_m": d}
                     for (_, r, d), a in list(zip(examples, answers))[:4]]
  return out
