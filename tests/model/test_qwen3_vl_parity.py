"""Full-model parity with HF `Qwen3VLForConditionalGeneration` (PyTorch fp32) on tiny random configs."""

import jax
import numpy as np
import pytest
import torch

from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.inputs import make_model_inputs
from tests.model import hf_reference as ref

TOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request):
  config = Qwen3VLConfig.tiny(tie_word_embeddings=request.param)
  hf = ref.make_hf_model(config, seed=1)
  flax_model, params = ref.jax_params_from_hf(hf, config)
  return config, hf, flax_model, params


def _hf_forward(hf, config, batch, patches, grids):
  kw = dict(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
            mm_token_type_ids=torch.tensor(batch["input_ids"] == config.image_token_id, dtype=torch.int))
  if patches:
    kw["pixel_values"] = torch.tensor(np.concatenate(patches))
    kw["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in grids])
  with torch.no_grad():
    out = hf(**kw, output_hidden_states=True)
    image_out = hf.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"]) if patches else None
  return out, image_out


def _jax_forward(flax_model, params, batch, images_per_row=None):
  args = {k: v for k, v in batch.items() if k != "rope_deltas"}
  # jitted: one compile per batch shape, where running op by op compiles every op of every shape
  return jax.jit(lambda p, a: flax_model.apply({"params": p}, **a, images_per_row=images_per_row))(params, args)


def _check(config, hf, flax_model, params, token_lists, patches, grids, padding_side, images_per_row=None):
  batch = make_model_inputs(token_lists, config, patches, grids, padding_side=padding_side)
  out, image_out = _hf_forward(hf, config, batch, patches, grids)
  slot = list(range(len(grids)))  # image i's slot in pixel_values
  if images_per_row:  # row r's images in slots r*K.., the rest of its K slots padding images
    k = images_per_row
    per_row = [sum(t == config.vision_start_token_id for t in ids) for ids in token_lists]
    slot = [r * k + j for r, n in enumerate(per_row) for j in range(n)]
    for name in ("pixel_values", "image_grid_hw"):
      x = batch[name]
      batch[name] = np.zeros((len(token_lists) * k,) + x.shape[1:], x.dtype)
      batch[name][slot] = x
  mine = _jax_forward(flax_model, params, batch, images_per_row)
  real = batch["attention_mask"].astype(bool)
  ref_logits = out.logits.numpy()
  assert np.abs(np.asarray(mine.logits)[real] - ref_logits[real]).max() < TOL
  # transformers 5 records the last hidden state after the final norm (the LM head's input).
  ref_hidden = out.hidden_states[-1].numpy()
  assert np.abs(np.asarray(mine.hidden_states)[real] - ref_hidden[real]).max() < TOL
  if patches:
    feats = mine.image_features
    counts = [(h // 2) * (w // 2) for h, w in grids]
    for level, ref_levels in enumerate(image_out.deepstack_features):
      for i, ref_feat in enumerate(ref_levels):
        got = np.asarray(feats.deepstack[level][slot[i], :counts[i]])
        assert np.abs(got - ref_feat.numpy()).max() < TOL
    # LLM last hidden at the image tokens, in token order, per image.
    is_img = batch["input_ids"] == config.image_token_id
    ref_img_hidden = ref_hidden[is_img]
    got = np.concatenate([np.asarray(feats.llm_last[slot[i], :c]) for i, c in enumerate(counts)])
    assert np.abs(got - ref_img_hidden).max() < TOL
    assert np.asarray(feats.valid).sum() == sum(counts)


def test_text_only(models):
  config, hf, flax_model, params = models
  rng = np.random.default_rng(0)
  toks = [list(rng.integers(100, 150000, 12)), list(rng.integers(100, 150000, 7))]
  _check(config, hf, flax_model, params, toks, [], [], "right")


def test_one_image(models):
  config, hf, flax_model, params = models
  rng = np.random.default_rng(1)
  grids = [(4, 6)]
  _check(config, hf, flax_model, params, [ref.build_prompt(rng, config, grids)],
         [ref.random_image_patches(rng, g, config) for g in grids], grids, "right")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_of_two_image_sizes_with_padding(models, padding_side):
  config, hf, flax_model, params = models
  rng = np.random.default_rng(2)
  grids_a, grids_b = [(6, 4)], [(8, 10), (4, 4)]  # row b: two images of different sizes
  toks = [ref.build_prompt(rng, config, grids_a, (3, 2)), ref.build_prompt(rng, config, grids_b, (6, 5))]
  grids = grids_a + grids_b
  _check(config, hf, flax_model, params, toks, [ref.random_image_patches(rng, g, config) for g in grids],
         grids, padding_side)


def test_images_per_row_places_within_rows(models):
  """Row-local placement (images_per_row=K: row r owns slots r*K..r*K+K-1, padding slots included)
  gives the reference's results, as the batch-order placement does."""
  config, hf, flax_model, params = models
  rng = np.random.default_rng(2)
  grids_a, grids_b = [(6, 4)], [(8, 10), (4, 4)]  # row a: one image and one padding slot
  toks = [ref.build_prompt(rng, config, grids_a, (3, 2)), ref.build_prompt(rng, config, grids_b, (6, 5))]
  grids = grids_a + grids_b
  _check(config, hf, flax_model, params, toks, [ref.random_image_patches(rng, g, config) for g in grids],
         grids, "left", images_per_row=2)
  batch = make_model_inputs(toks, config, [ref.random_image_patches(rng, g, config) for g in grids], grids)
  with pytest.raises(ValueError, match="images_per_row=2: pixel_values has 3 images for 2 rows; expected 4"):
    _jax_forward(flax_model, params, batch, images_per_row=2)
