"""DepthVLM-Bench protocol: ground truth gives δ1 = 1, the 2 m baseline equals plain NumPy on the raw
files, coordinate frames are chosen and reported per record, and an interrupted run resumes exactly."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from depthvlm_jax.evaluation import metrics, predictors, protocol, runner
from depthvlm_jax.model.resize import resize_bilinear_align_corners
from tests.conftest import SHARED_DATA
from tests.evaluation.helpers import write_dataset

FRAMES = SHARED_DATA / "scannetpp_examples"
needs_frames = pytest.mark.skipif(not FRAMES.exists(), reason=f"{FRAMES} not present")
SCANNETPP = runner.EvalDataset("scannetpp", str(FRAMES / "examples.jsonl"), str(FRAMES / "rgb"), str(FRAMES / "depth"))


@needs_frames
@pytest.mark.parametrize("coord_mode,frame", [("official", "rgb"), ("correct", "depth")])
def test_ground_truth_gives_delta1_one(tmp_path, coord_mode, frame):
  s = runner.run(predictors.GroundTruth(), [SCANNETPP], tmp_path, ("sparse", "dense"), coord_mode, batch_size=2,
             progress=False)
  d = s["datasets"]["scannetpp"]
  for mode in ("sparse", "dense"):
    assert d[mode]["images"] == 4 and d[mode]["delta1"] == 1.0 and d[mode]["abs_rel"] == 0.0
    assert s["average"][mode]["delta1"] == 1.0
  assert d["sparse"]["frames"] == {frame: 4} and d["sparse"]["points"] >= 36
  assert f"{frame}:4" in s["table"]
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["datasets"]["scannetpp"]["sparse"]["frames"] == {frame: 4}


def _raw(record):
  return np.asarray(Image.open(FRAMES / "depth" / record["depth_path"])).astype(np.float64) / 1000.0


def _canonical_gt(record):
  """Nearest resize (pixel centres) of the raw depth map to canonical_size, then the ScanNet++ range."""
  raw = _raw(record)
  w, h = record["canonical_size"]
  ys = ((np.arange(h) + 0.5) * raw.shape[0] / h).astype(int)
  xs = ((np.arange(w) + 0.5) * raw.shape[1] / w).astype(int)
  g = raw[ys][:, xs]
  return np.where((g >= 0.001) & (g <= 10), g, 0)


def _d1(pred, gt):
  m = (gt > 0) & (pred > 0)
  return np.mean(np.maximum(pred[m] / gt[m], gt[m] / pred[m]) < 1.25)


@needs_frames
def test_constant_2m_equals_numpy_on_raw_files(tmp_path):
  records = [json.loads(l) for l in (FRAMES / "examples.jsonl").read_text().splitlines() if l.strip()]
  dense = np.mean([_d1(np.full_like(g, 2.0), g) for g in map(_canonical_gt, records)])
  # correct frame: the points are depth-map pixels, whose values are the record's `depth` list
  sparse_correct = np.mean([_d1(np.full(len(r["depth"]), 2.0), np.asarray(r["depth"])) for r in records])
  official = []
  for r in records:  # the official arithmetic: scale as RGB pixels, round, read the canonical map there
    g = _canonical_gt(r)
    xy = np.round(np.asarray(r["pixel_coords"], float) * np.asarray(r["canonical_size"]) / r["original_rgb_size"])
    vals = g[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    official.append(_d1(np.full(len(vals), 2.0), np.where(vals > 0, vals, r["depth"])))
  got = {c: runner.run(predictors.ConstantDepth(2.0), [SCANNETPP], tmp_path / c, ("sparse", "dense"), c, progress=False)
         for c in ("correct", "official")}
  assert got["correct"]["datasets"]["scannetpp"]["dense"]["delta1"] == pytest.approx(dense, abs=1e-6)
  assert got["correct"]["datasets"]["scannetpp"]["sparse"]["delta1"] == pytest.approx(sparse_correct, abs=1e-6)
  assert got["official"]["datasets"]["scannetpp"]["sparse"]["delta1"] == pytest.approx(np.mean(official), abs=1e-6)
  assert got["correct"]["average"]["dense"]["delta1"] == pytest.approx(dense, abs=1e-6)


def test_interrupted_run_resumes_to_the_same_table(tmp_path):
  ds = [runner.EvalDataset("a", str(write_dataset(tmp_path / "a", 5, seed=1)), str(tmp_path / "a/rgb"),
                       str(tmp_path / "a/depth"), "nyuv2", "depth"),
        runner.EvalDataset("b", str(write_dataset(tmp_path / "b", 3, seed=2)), str(tmp_path / "b/rgb"),
                       str(tmp_path / "b/depth"), "nyuv2", "depth")]
  pred = predictors.ConstantDepth(2.5)
  once = runner.run(pred, ds, tmp_path / "once", batch_size=2, progress=False)

  class Interrupt(Exception):
    pass

  def stop(done):
    if done >= 3:
      raise Interrupt

  with pytest.raises(Interrupt):
    runner.run(pred, ds, tmp_path / "twice", batch_size=2, progress=False, after_batch=stop)
  lines = (tmp_path / "twice" / runner.RESULTS_FILE).read_text().splitlines()
  assert 0 < len(lines) < 8
  with (tmp_path / "twice" / runner.RESULTS_FILE).open("a") as f:
    f.write('{"key": "a:9:torn')  # killed in the middle of a write
  seen = []
  twice = runner.run(pred, ds, tmp_path / "twice", batch_size=2, progress=False, after_batch=seen.append)
  assert seen[-1] == 8 - len(lines)  # only the missing images were evaluated
  assert twice["table"] == once["table"] and twice["datasets"] == once["datasets"]
  assert twice["average"] == once["average"]
  assert len((tmp_path / "twice" / runner.RESULTS_FILE).read_text().splitlines()) == 8
  with pytest.raises(runner.EvalConfigError, match="different run"):
    runner.run(predictors.ConstantDepth(3.0), ds, tmp_path / "twice", progress=False)


def test_frame_choice_per_record(tmp_path):
  root = tmp_path / "d"
  path = write_dataset(root, 2)
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  lines[1]["pixel_coords_frame"] = "rgb"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  ds = runner.EvalDataset("x", str(path), str(root / "rgb"), str(root / "depth"), "nyuv2")
  items, _ = runner.plan([ds], ("sparse",), "correct")  # record 0: depth-sized coords, no setting: skipped
  assert items[0].skip[0] == "bad_coordinates" and "cannot tell" in items[0].skip[1] and items[1].skip is None
  items, _ = runner.plan([runner.EvalDataset(**{**ds.__dict__, "coord_frame": "depth"})], ("sparse",), "correct")
  assert [(i.frame.frame, i.frame.why) for i in items] == [("depth", "dataset setting"), ("rgb", "record")]
  items, _ = runner.plan([ds], ("sparse",), "official")
  assert {i.frame.frame for i in items} == {"rgb"}
  # a coordinate beyond the depth map can only be an RGB pixel; "depth" is then refused
  rec = runner.plan([ds], ("dense",), "correct")[0][0].record
  far = rec.__class__(**{**rec.__dict__, "pixel_coords": ((40.0, 30.0),), "depth": (1.0,)})
  assert protocol.choose_frame(far, "correct", "nyuv2") == ("rgb", "coordinates exceed the depth map")
  with pytest.raises(protocol.FrameError, match="cannot be depth-map pixels"):
    protocol.choose_frame(far, "correct", "nyuv2", dataset_frame="depth")
  same = rec.__class__(**{**rec.__dict__, "original_depth_size": rec.original_rgb_size})
  assert protocol.choose_frame(same, "correct", "nyuv2")[0] == "rgb"
  # correct mode reads the annotated depths back at depth-frame points; the wrong frame does not
  s = runner.run(predictors.GroundTruth(), [runner.EvalDataset(**{**ds.__dict__, "coord_frame": "depth"})], tmp_path / "o",
             ("sparse",), "correct", progress=False)
  assert s["datasets"]["x"]["sparse"]["delta1"] == 1.0


def test_host_metrics_and_resize_match_jax():
  rng = np.random.default_rng(0)
  gt = rng.uniform(0.5, 10, (2, 9, 13)).astype(np.float32)
  gt[rng.random(gt.shape) < 0.3] = 0
  pred = (gt * rng.uniform(0.7, 1.4, gt.shape) + 0.1).astype(np.float32)
  a = metrics.depth_metrics_per_image(pred, gt, xp=np)
  b = metrics.depth_metrics_per_image(jnp.asarray(pred), jnp.asarray(gt))
  for k in metrics.METRIC_NAMES + ("count",):
    np.testing.assert_allclose(a[k], np.asarray(b[k]), rtol=1e-5, err_msg=k)
  x = rng.uniform(0, 5, (7, 11)).astype(np.float32)
  want = np.asarray(resize_bilinear_align_corners(jnp.asarray(x)[None, ..., None], (20, 3)))[0, ..., 0]
  np.testing.assert_allclose(protocol.resize_map(x, (20, 3)), want, rtol=1e-6, atol=1e-6)


def test_train_median_and_bad_settings(tmp_path):
  path = write_dataset(tmp_path, 3, seed=4)
  ds = runner.EvalDataset("t", str(path), str(tmp_path / "rgb"), str(tmp_path / "depth"), "nyuv2")
  pixels = np.concatenate([np.asarray(Image.open(tmp_path / "depth" / f"{i}.png")).ravel() / 1000.0
                           for i in range(3)])  # canonical = 2x nearest upsampling: same pixel multiset x4
  want = np.median(pixels[pixels > 0])
  assert predictors.train_median_depth(ds) == pytest.approx(want, rel=1e-3)
  base = predictors.make_baseline(f"constant:train_median:{path}|{tmp_path / 'rgb'}|{tmp_path / 'depth'}|nyuv2")
  assert base.value == pytest.approx(want, rel=1e-3)
  for bad in ("constant:-1", "median", "constant:x"):
    with pytest.raises(runner.EvalConfigError):
      predictors.make_baseline(bad)
  with pytest.raises(runner.EvalConfigError, match="NAME=JSONL"):
    runner.parse_dataset("no_equals_sign")
  with pytest.raises(runner.EvalConfigError, match="not found"):
    runner.run(predictors.GroundTruth(), [runner.EvalDataset("m", str(tmp_path / "missing.jsonl"), str(tmp_path))],
           tmp_path / "o", progress=False)


def _upload(local, remote) -> None:
  for f in local.rglob("*"):
    if f.is_file():
      (remote / f.relative_to(local).as_posix()).write_bytes(f.read_bytes())


def test_dataset_and_results_on_gcs_resume_to_the_local_table(gcs, tmp_path, monkeypatch):
  """Annotation file, images and depth maps read from gs://; results written there (per_image.jsonl
  rewritten whole: objects have no appends) and read back; an interrupted run resumes there."""
  from etils import epath
  from depthvlm_jax import evaluate
  write_dataset(tmp_path / "a", 5, seed=1)
  remote = epath.Path("gs://test-bucket/evalset/a")
  _upload(tmp_path / "a", remote)
  local_ds = runner.EvalDataset("a", str(tmp_path / "a/ann.jsonl"), str(tmp_path / "a/rgb"), str(tmp_path / "a/depth"),
                                "nyuv2", "depth")
  gcs_ds = runner.EvalDataset("a", f"{remote}/ann.jsonl", f"{remote}/rgb", f"{remote}/depth", "nyuv2", "depth")
  pred = predictors.ConstantDepth(2.5)
  once = runner.run(pred, [local_ds], tmp_path / "once", batch_size=2, progress=False)
  assert once["datasets"]["a"]["images"] == 5

  out = epath.Path("gs://test-bucket/eval")
  results = out / runner.RESULTS_FILE
  held = []  # (images done, lines of the results object) after each batch

  def lines():
    return len(results.read_text().splitlines()) if results.exists() else 0

  class Interrupt(Exception):
    pass

  def stop(done):
    held.append((done, lines()))
    if done >= 3:
      raise Interrupt

  monkeypatch.setattr(runner, "REWRITE_EVERY_S", 1e9)  # rewritten only when the run stops
  with pytest.raises(Interrupt):
    runner.run(pred, [gcs_ds], out, batch_size=2, progress=False, after_batch=stop)
  assert held == [(2, 0), (4, 0)] and lines() == 4  # written when the run stopped on an error
  results.write_text(results.read_text() + '{"key": "a:9:torn')  # killed in the middle of a rewrite
  monkeypatch.setattr(runner, "REWRITE_EVERY_S", 0.0)  # rewritten after every batch
  held.clear()
  twice = runner.run(pred, [gcs_ds], out, batch_size=2, progress=False, after_batch=lambda done: held.append((done, lines())))
  assert held == [(1, 5)]  # only the missing image was evaluated; the torn line is gone
  assert results.read_text().endswith("\n")
  assert twice["table"] == once["table"] and twice["datasets"] == once["datasets"]
  assert json.loads((out / runner.SUMMARY_FILE).read_text())["datasets"] == once["datasets"]

  cli_out = "gs://test-bucket/eval_cli"  # the command line: the output prefix checked, written and read back
  summary = evaluate.main([f"--data=a={remote}/ann.jsonl|{remote}/rgb|{remote}/depth|nyuv2", "--coord_frame=a=depth",
                           "--baseline=constant:2.5", f"--out={cli_out}", "--batch_size=2"])
  assert summary["datasets"] == once["datasets"]
  assert json.loads((epath.Path(cli_out) / runner.SUMMARY_FILE).read_text())["table"] == once["table"]
  assert not [p for p in epath.Path(cli_out).iterdir() if p.name.startswith(".write_check")]
