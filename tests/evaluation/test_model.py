"""The CLIs on a tiny random DepthVLM: one loader for HF directories and training workdirs; predict
writes every file with the right shapes from one prefill; the evaluator's sharded batches equal the
unsharded ones."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from depthvlm_jax import export, predict, sharding
from depthvlm_jax.evaluation import loading, outputs, predictors, protocol, runner
from depthvlm_jax.model.config import Qwen3VLConfig
from depthvlm_jax.model.depthvlm import DepthHeadConfig, DepthVLM, depthvlm_dummy_inputs
from depthvlm_jax.model.inputs import make_model_inputs
from depthvlm_jax.model.layers import abstract_params
from depthvlm_jax.processing import chat
from depthvlm_jax.processing.image_processor import preprocess_image
from tests.evaluation.helpers import random_params, write_dataset


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  config = Qwen3VLConfig.tiny(tie_word_embeddings=True)  # half the bytes to write and read
  model = DepthVLM(config, head=DepthHeadConfig.tiny())
  params = random_params(model, seed=1)
  return export.write_hf_dir(params, config, model.head, tmp_path_factory.mktemp("m") / "hf")


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return loading.load_model(hf_dir)


@pytest.mark.slow
def test_predict_writes_every_output(tmp_path, hf_dir, loaded):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
  (tmp_path / "list.txt").write_text("a.png 100\n# comment\nb.jpg\n")
  images = predict.list_images(tmp_path / "list.txt", fx=100.0)  # one size and fx: one compiled program
  assert [(p.name, f) for p, f in images] == [("a.png", 100.0), ("b.jpg", 100.0)]
  assert [p.name for p, _ in predict.list_images(tmp_path)] == ["a.png", "b.jpg"]  # a folder
  rows = predict.predict_many(loaded, images, tmp_path / "o", max_new_tokens=3, progress=False)
  for r, (h, w) in zip(rows, [(50, 70), (50, 70)]):
    f = r["files"]
    depth = np.load(f["npy"])
    assert depth.shape == (h, w) and depth.dtype == np.float32 and (depth > 0).all()
    png = np.asarray(Image.open(f["png"]))
    assert png.dtype == np.uint16 and png.shape == (h, w)
    np.testing.assert_array_equal(png, np.round(depth * 1000).astype(np.uint16))
    assert np.asarray(Image.open(f["vis"])).shape == (h, 2 * w, 3)
    points, colours = outputs.read_ply(f["ply"])
    assert points.shape == (h * w, 3) and colours.shape == (h * w, 3)
    np.testing.assert_allclose(points[:, 2], depth.reshape(-1), rtol=1e-6)  # row-major, all valid
    info = json.loads(open(f["json"]).read())
    assert info["text"] == r["text"] and info["points"] == h * w and info["original_size"] == [h, w]
  assert len((tmp_path / "o" / "predictions.jsonl").read_text().splitlines()) == 2

  # the depth of the generation prefill equals a plain DepthVLM forward on the same inputs
  res = predict.predict_image(loaded, tmp_path / "a.png", fx=100, max_new_tokens=3)
  canonical = np.asarray(Image.open(tmp_path / "a.png").convert("RGB").resize(
      (res["canonical_size"][1], res["canonical_size"][0]), Image.Resampling.BILINEAR))
  patches, grid = preprocess_image(canonical, loaded.processor, size=res["processed_size"])
  ids = chat.encode_sample(loaded.tokenizer, chat.DEFAULT_PROMPT, [int(grid[1] * grid[2] // 4)])["input_ids"]
  batch = make_model_inputs([ids], loaded.model.config, [patches], [grid[1:]])
  batch.pop("rope_deltas")
  fwd = jax.jit(lambda p, b: loaded.model.apply({"params": p}, **b, compute_logits=False,
                                                depth_grid=(int(grid[1]) // 2, int(grid[2]) // 2)).depth)
  direct = protocol.resize_map(np.asarray(fwd(loaded.params, batch)[0]), res["original_size"])
  np.testing.assert_allclose(res["depth"], direct, rtol=1e-4)
  assert res["text"] == rows[0]["text"]
  with pytest.raises(predict.PredictError, match="no such image"):
    predict.list_images(tmp_path / "missing.png")
  (tmp_path / "bad.txt").write_text("a.png not_a_number\n")
  with pytest.raises(predict.PredictError, match="bad.txt:1"):
    predict.list_images(tmp_path / "bad.txt")


def test_images_folders_and_list_files_on_gcs(gcs):
  from etils import epath
  folder = epath.Path("gs://test-bucket/images")
  rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
  for name in ("a.png", "sub/b.png"):
    with (folder / name).open("wb") as f:
      Image.fromarray(rgb).save(f, format="PNG")
  (folder / "list.txt").write_text(f"a.png 500\nsub/b.png\n{folder}/a.png 300\n")  # relative to the list, or full
  assert predict.list_images(str(folder)) == [(folder / "a.png", None)]
  assert predict.list_images(f"{folder}/list.txt", fx=100.0) == [
      (folder / "a.png", 500.0), (folder / "sub/b.png", 100.0), (folder / "a.png", 300.0)]
  np.testing.assert_array_equal(predict.load_image(f"{folder}/sub/b.png"), rgb)
  with pytest.raises(predict.PredictError, match="no such image"):
    predict.list_images(f"{folder}/missing.png")


@pytest.mark.slow
def test_sharded_model_evaluation_equals_unsharded(tmp_path, loaded):
  from depthvlm_jax import sharding
  path = write_dataset(tmp_path / "d", 3, seed=3)
  ds = [runner.EvalDataset("d", str(path), str(tmp_path / "d/rgb"), str(tmp_path / "d/depth"), "nyuv2", "depth")]
  mesh = sharding.make_mesh({"data": 2}, jax.devices()[:2])
  plain = runner.run(predictors.ModelPredictor(loaded, batch_size=2), ds, tmp_path / "p", progress=False)
  sharded_loaded = loading.load_model(loaded.path, mesh=mesh)
  assert sharded_loaded.kind == "hf_depthvlm" and sharded_loaded.head_trained
  compiles = []

  def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") == "jit(depth_maps)":
      compiles.append(1)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:  # one image per device: two batches of 2 (the last padded), one program
    sharded = runner.run(predictors.ModelPredictor(sharded_loaded, batch_size=1, mesh=mesh), ds, tmp_path / "s",
                         progress=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert len(compiles) == 1
  for mode in ("sparse", "dense"):
    a, b = plain["datasets"]["d"][mode], sharded["datasets"]["d"][mode]
    assert a["images"] == b["images"] == 3
    for k in ("delta1", "abs_rel", "rmse", "silog"):
      assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (mode, k)


@pytest.mark.slow
def test_int8_sharded_evaluation_is_close_to_float(tmp_path, loaded):
  """`evaluate --quantize=int8` on a 2-device mesh: the int8 backbone's metrics stay within 1% of the
  float model's on this tiny random model."""
  from depthvlm_jax import sharding
  path = write_dataset(tmp_path / "d", 3, seed=3)
  ds = [runner.EvalDataset("d", str(path), str(tmp_path / "d/rgb"), str(tmp_path / "d/depth"), "nyuv2", "depth")]
  plain = runner.run(predictors.ModelPredictor(loaded, batch_size=2), ds, tmp_path / "p", progress=False)
  mesh = sharding.make_mesh({"data": 2}, jax.devices()[:2])
  int8 = loading.load_model(loaded.path, mesh=mesh, quantize="int8")
  got = runner.run(predictors.ModelPredictor(int8, batch_size=1, mesh=mesh), ds, tmp_path / "q", progress=False)
  for mode in ("sparse", "dense"):
    a, b = plain["datasets"]["d"][mode], got["datasets"]["d"][mode]
    assert a["images"] == b["images"] == 3
    for k in ("abs_rel", "rmse", "silog"):
      assert b[k] == pytest.approx(a[k], rel=1e-2, abs=1e-4), (mode, k)
  with pytest.raises(loading.ModelLoadError, match="quantize='int4': expected one of"):
    loading.load_model(loaded.path, quantize="int4")


@pytest.mark.slow
def test_loader_reads_a_training_workdir_and_refuses_junk(tmp_path, hf_dir, loaded):
  from configs import stage1
  from depthvlm_jax.runs import checkpoints, model_from_config
  config = stage1.get_config()
  config.model.hf_dir = str(hf_dir)  # a run on this backbone, with the tiny head's widths
  head = DepthHeadConfig.tiny()
  config.model.dpt_features, config.model.dpt_out_channels = head.features, head.out_channels
  config.model.dpt_head_features = head.head_features
  model = model_from_config.build_model(config)
  params = loaded.params
  work = tmp_path / "run"
  work.mkdir()
  (work / "config.json").write_text(config.to_json_best_effort(indent=2))
  mgr = checkpoints.manager(work / "checkpoints", keep=1, async_save=False)
  trainable = {"depth_head": params["depth_head"]}
  frozen = {k: v for k, v in params.items() if k != "depth_head"}
  checkpoints.save(mgr, 1, {"params": trainable, "step": np.int32(1)}, frozen, None)
  mgr.wait_until_finished()
  got = loading.load_model(work)
  assert got.kind == "workdir" and got.model.head == model.head
  flat_a = jax.tree.leaves(params)
  flat_b = jax.tree.leaves(got.params)
  assert len(flat_a) == len(flat_b) and all(np.array_equal(np.asarray(a), np.asarray(b))
                                            for a, b in zip(flat_a, flat_b))
  # read straight onto a mesh's shards, in the requested dtype (what export --dtype=bfloat16 and
  # evaluate's mesh use): the same values, cast
  mesh = sharding.make_mesh({"data": -1})
  got16 = loading.load_model(work, dtype=jnp.bfloat16, mesh=mesh)
  for a, b in zip(flat_a, jax.tree.leaves(got16.params)):
    assert b.dtype == jnp.bfloat16 and b.sharding.mesh.shape == mesh.shape
    np.testing.assert_array_equal(np.asarray(b), np.asarray(jnp.asarray(a).astype(jnp.bfloat16)))
  with pytest.raises(loading.ModelLoadError, match="not a directory"):
    loading.load_model(tmp_path / "nope")
  with pytest.raises(loading.ModelLoadError, match="no config.json"):
    loading.load_model(tmp_path)


@pytest.mark.slow
def test_loader_gives_a_plain_qwen3_vl_directory_a_fresh_head(tmp_path, loaded):
  backbone = {k: v for k, v in loaded.params.items() if k != "depth_head"}
  d = export.write_hf_dir(backbone, loaded.model.config, None, tmp_path / "qwen", processing_files=False)
  cfg = json.loads((d / "config.json").read_text())  # tiny head widths (no depth_head_type, no weights)
  widths = DepthHeadConfig.tiny().to_hf_dict()
  cfg.update({k: v for k, v in widths.items() if k != "depth_head_type"})
  (d / "config.json").write_text(json.dumps(cfg))
  got = loading.load_model(d)
  assert got.kind == "hf_qwen3_vl" and not got.head_trained and got.model.head == DepthHeadConfig.tiny()
  assert all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(backbone), jax.tree.leaves({k: v for k, v in got.params.items()
                                                                          if k != "depth_head"})))
  want = abstract_params(got.model, **depthvlm_dummy_inputs(got.model.config))
  shapes = jax.tree.map(lambda x: x.shape, want["depth_head"])
  assert jax.tree.map(lambda x: x.shape, got.params["depth_head"]) == shapes


def test_official_protocol_feeds_the_model_like_the_authors(tmp_path, loaded, monkeypatch):
  """Official protocol: the model input is qwen-vl-utils' image then the processor's resize, after the
  system turn; dense compares cv2's INTER_LINEAR resize of the processed-size map with the OpenCV GT."""
  import cv2
  from data_pipelines import rgbd
  from depthvlm_jax.model import inputs
  from depthvlm_jax.processing import image_processor as ip
  from tests.evaluation.helpers import import_qwen_vl_utils
  q = import_qwen_vl_utils()
  path = write_dataset(tmp_path / "d", 1, seed=6, rgb_wh=(101, 75), depth_wh=(50, 37))
  ds = runner.EvalDataset("d", str(path), str(tmp_path / "d/rgb"), str(tmp_path / "d/depth"), "nyuv2")
  seen = {}
  monkeypatch.setattr(inputs, "make_model_inputs", lambda ids, config, patches, *a, **k: seen.update(
      ids=ids, patches=patches) or make_model_inputs(ids, config, patches, *a, **k))
  predictor = predictors.ModelPredictor(loaded, batch_size=1)
  fwd = predictor._fwd

  def recording_fwd(*args):
    seen["depth"] = np.asarray(fwd(*args), np.float32)
    return seen["depth"]

  predictor._fwd = recording_fwd
  out = runner.run(predictor, [ds], tmp_path / "o", ("dense",), "official", progress=False)
  row = json.loads((tmp_path / "o" / runner.RESULTS_FILE).read_text())
  proc, tok = loaded.processor, loaded.tokenizer
  rec = rgbd.read_jsonl(path)[0][0]
  sample = rgbd.load_sample(rec, ds.image_root, ds.depth_root, "nyuv2", nearest_rule="opencv", exif_transpose=False)
  image = q.fetch_image({"type": "image", "image": Image.fromarray(sample.image)})
  hp, wp = ip.smart_resize(image.height, image.width, proc.factor, proc.min_pixels, proc.max_pixels)
  patches, _ = preprocess_image(image, proc, size=(hp, wp))
  np.testing.assert_array_equal(seen["patches"][0], patches)
  text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          f"<|vision_start|><|image_pad|><|vision_end|>{rec.prompt or chat.DEFAULT_PROMPT}<|im_end|>\n"
          "<|im_start|>assistant\n")
  ids = chat.expand_image_pads(tok(text, add_special_tokens=False).input_ids,
                               tok.convert_tokens_to_ids("<|image_pad|>"), [hp * wp // 1024])
  assert list(seen["ids"][0]) == ids
  assert seen["depth"].shape == (1, hp, wp) and (hp, wp) == ip.processed_size(75, 101, proc, "official")
  pred = cv2.resize(seen["depth"][0], sample.depth.shape[::-1], interpolation=cv2.INTER_LINEAR)
  m = (sample.depth > 0) & (pred > 0)
  ratio = np.maximum(pred[m] / sample.depth[m], sample.depth[m] / pred[m])
  assert row["results"]["dense"]["delta1"] == pytest.approx(np.mean(ratio < 1.25), abs=1e-9)
  assert out["preprocessing"] == "official" and out["datasets"]["d"]["dense"]["images"] == 1


def test_predict_official_preprocessing(loaded):
  from depthvlm_jax.processing import image_processor as ip
  rgb = np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)
  res = predict.predict_image(loaded, rgb, fx=1000, max_new_tokens=1, preprocessing="official")
  assert res["canonical_size"] == (300, 400) and res["depth"].shape == (300, 400)
  # 300x400 -> qwen-vl-utils 308x392 -> processor 320x384 (one resize: 288x384)
  assert res["processed_size"] == ip.processed_size(300, 400, loaded.processor, "official") == (320, 384)
  assert ip.processed_size(300, 400, loaded.processor, "direct") == (288, 384)
