"""The official protocol reproduces the authors' evaluator: each convention equals the reference library
(OpenCV, qwen-vl-utils) on the same inputs, and the 2 m baseline on the shared ScanNet++ frames gives
the authors' own figures. Broken records never stop a run in either protocol."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from data_pipelines import rgbd
from depthvlm_jax import evaluate as ev
from depthvlm_jax.evaluation import metrics, predictors, protocol, runner
from depthvlm_jax.processing import image_processor as ip
from tests.conftest import SHARED_DATA
from tests.evaluation.helpers import import_qwen_vl_utils, write_dataset

FRAMES = SHARED_DATA / "scannetpp_examples"
needs_frames = pytest.mark.skipif(not FRAMES.exists(), reason=f"{FRAMES} not present")
SCANNETPP = f"scannetpp={FRAMES / 'examples.jsonl'}|{FRAMES / 'rgb'}|{FRAMES / 'depth'}"
# (in, out) lengths: the ScanNet++ depth-to-canonical upsamplings, processed-to-canonical resizes of
# both preprocessings, odd small ones, downsampling and identity.
SIZES = [(192, 1006), (256, 1342), (192, 1004), (256, 1339), (1024, 1006), (1344, 1342), (992, 1006),
         (7, 20), (20, 7), (5, 3), (3, 3000), (13, 91), (480, 777), (1000, 99), (64, 32), (9, 9)]


@needs_frames
def test_official_constant_2m_gives_the_authors_figures(tmp_path, capsys):
  """Authors' eval/eval.py on these four frames with a constant 2 m prediction: sparse 0.075000,
  dense 0.285620 (the authors' evaluation of the released checkpoint)."""
  summary = ev.main(["--baseline", "constant:2", "--protocol", "official", "--data", SCANNETPP,
                     "--out", str(tmp_path / "o"), "--workers", "1"])
  d = summary["datasets"]["scannetpp"]
  assert f"{d['sparse']['delta1']:.6f}" == "0.075000" and f"{d['dense']['delta1']:.6f}" == "0.285620"
  assert d["sparse"]["images"] == d["dense"]["images"] == 4 and d["sparse"]["frames"] == {"rgb": 4}
  printed = capsys.readouterr().out
  assert "protocol: official" in printed and "skipped records: none" in printed
  assert "0.075000" in printed and "0.285620" in printed
  # the former --coords name selects the same protocol (and may resume the same directory)
  again = ev.main(["--baseline", "constant:2", "--coords", "official", "--data", SCANNETPP,
                   "--out", str(tmp_path / "o"), "--workers", "1"])
  assert again["datasets"] == summary["datasets"]


@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_nearest_rules_equal_opencv(n_in, n_out):
  rng = np.random.default_rng(n_in * 7919 + n_out)
  x = rng.uniform(0.1, 10, (n_in, n_in + 3)).astype(np.float32)
  out_wh = (n_out + 5, n_out)
  want = cv2.resize(x, out_wh, interpolation=cv2.INTER_NEAREST)
  np.testing.assert_array_equal(rgbd.resize_nearest(x, out_wh, "opencv"), want)


@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_linear_resize_equals_opencv(n_in, n_out):
  rng = np.random.default_rng(n_in * 31 + n_out)
  x = rng.uniform(0.1, 10, (n_in, n_in + 3)).astype(np.float32)
  want = cv2.resize(x, (n_out + 5, n_out), interpolation=cv2.INTER_LINEAR)
  got = protocol.resize_linear_opencv(x, (n_out, n_out + 5))
  np.testing.assert_allclose(got, want, rtol=5e-6, atol=0)


@needs_frames
def test_official_dense_and_gt_equal_opencv_on_real_frames():
  """Per frame: the official GT map is cv2's INTER_NEAREST of the range-masked depth, and δ1 of a
  smooth processed-size prediction resized by our rule equals δ1 after cv2's INTER_LINEAR."""
  conv = protocol.CONVENTIONS["official"]
  records, _ = rgbd.read_jsonl(FRAMES / "examples.jsonl")
  for r in records:
    s = rgbd.load_sample(r, FRAMES / "rgb", FRAMES / "depth", "scannetpp", nearest_rule=conv.nearest_rule,
                         exif_transpose=False)
    raw = cv2.imread(str(FRAMES / "depth" / r.depth_path), cv2.IMREAD_UNCHANGED).astype(np.float32) / 1000.0
    raw[(raw < 0.001) | (raw > 10)] = 0
    np.testing.assert_array_equal(s.depth, cv2.resize(raw, r.canonical_size, interpolation=cv2.INTER_NEAREST))
    hp, wp = ip.processed_size(*s.depth.shape, ip.ImageProcessorConfig(), "official")
    pred = cv2.resize(np.where(raw > 0, raw, 2.0), (wp, hp), interpolation=cv2.INTER_LINEAR) * 1.1
    ours = metrics.image_metrics(protocol.resize_linear_opencv(pred, s.depth.shape), s.depth)["delta1"]
    ref = metrics.image_metrics(cv2.resize(pred, r.canonical_size, interpolation=cv2.INTER_LINEAR), s.depth)
    assert ours == ref["delta1"] and 0.2 < ours < 1


def test_qwen_vl_utils_sizes_and_first_resize_equal_the_library():
  q = import_qwen_vl_utils()
  rng = np.random.default_rng(0)
  sizes = [(1006, 1342), (1004, 1339), (1024, 1024), (10, 1000), (1, 150), (14, 14), (27, 29), (3000, 4000),
           (6048, 4032), (4000, 20)] + [tuple(rng.integers(1, 5000, 2)) for _ in range(300)]
  for h, w in sizes:
    if max(h, w) / min(h, w) > 200:
      continue
    assert ip.qwen_vl_utils_size(int(h), int(w)) == q.smart_resize(int(h), int(w), 28), (h, w)
  assert ip.processed_size(1006, 1342, ip.ImageProcessorConfig(), "official") == (1024, 1344)
  assert ip.processed_size(1006, 1342, ip.ImageProcessorConfig(), "direct") == (992, 1344)
  for hw, mode in [((61, 83), "RGB"), ((100, 37), "RGBA"), ((33, 64), "L")]:
    arr = rng.integers(0, 255, hw + ((len(mode),) if mode != "L" else ()), dtype=np.uint8)
    im = Image.fromarray(arr, mode)
    want = q.fetch_image({"type": "image", "image": im})
    np.testing.assert_array_equal(np.asarray(ip.official_first_resize(im)), np.asarray(want))
  # the whole official input: process_vision_info, then the processor's resize to multiples of 32
  canonical = Image.fromarray(rng.integers(0, 255, (75, 101, 3), dtype=np.uint8))
  images, _ = q.process_vision_info([{"role": "user", "content": [{"type": "image", "image": canonical},
                                                                  {"type": "text", "text": "x"}]}])
  cfg = ip.ImageProcessorConfig(min_pixels=32 * 32)
  size = ip.processed_size(75, 101, cfg, "official")
  want = ip.preprocess_image(images[0], cfg)  # the processor on the qwen-vl-utils image
  got = ip.preprocess_image(canonical, cfg, size=size, preprocessing="official")
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert images[0].size == (112, 84) and size == (96, 128)  # 75x101 -> 84x112 -> 96x128
  assert ip.processed_size(75, 101, cfg, "direct") == (64, 96)


def test_official_coordinates_round_like_the_authors():
  """x * (Wc / W) minus the float crop offset (Wc - crop) / 2, rounded half to even."""
  sample = rgbd.CanonicalSample(np.zeros((1024, 1024, 3), np.uint8), None, (171, 0), (1367, 1024))
  pts = protocol.canonical_points(np.array([[0, 0], [10, 5], [1919, 1439], [1, 1]]), (1920, 1440), sample, "official")
  want = [[round(0 - 171.5), 0], [round(10 * (1367 / 1920) - 171.5), round(5 * (1024 / 1440))],
          [round(1919 * (1367 / 1920) - 171.5), round(1439 * (1024 / 1440))],
          [round(1367 / 1920 - 171.5), round(1024 / 1440)]]
  assert pts.tolist() == want and pts[0, 0] == -172  # Python's round is also half to even
  correct = protocol.canonical_points(np.array([[0, 0], [1919, 1439]]), (1920, 1440), sample, "correct")
  assert correct.tolist() == [[-171, 0], [1366 - 171, 1023]]


def _records(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path, lines):
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def _results_by_line(out_dir):
  """Results of the evaluated (not skipped, not empty) records, in file order."""
  rows = [json.loads(l) for l in (out_dir / runner.RESULTS_FILE).read_text().splitlines()]
  rows.sort(key=lambda r: int(r["source"].rsplit(":", 1)[1]))
  return [r["results"] for r in rows if "results" in r and not r.get("empty")]


def test_broken_records_run_to_the_end_in_both_protocols(tmp_path, capsys):
  root = tmp_path / "d"
  path = write_dataset(root, 6, seed=5)
  good = _records(path)
  depth_dir = root / "depth"
  (depth_dir / "5.png").write_bytes((depth_dir / "5.png").read_bytes()[:200])  # truncated PNG
  (root / "rgb" / "4.png").unlink()  # missing image
  (depth_dir / "3.png").unlink()  # missing depth
  Image.fromarray(np.full((24, 32), 65000, np.uint16)).save(depth_dir / "empty.png")  # 65 m: out of range
  neg = dict(good[0], pixel_coords=[[-1, 2]] + good[0]["pixel_coords"][1:])
  far = dict(good[1], pixel_coords=good[1]["pixel_coords"][:-1] + [[32, 0]])  # x == depth-map width
  no_scale = {k: v for k, v in good[2].items() if k != "depth_scale"}
  empty = dict(good[0], depth_path="empty.png")
  # lines: 1, 2 good; 3 negative x; 4 bad JSON; 5 x beyond the frame; 6 good; 7 no depth_scale;
  # 8 missing depth; 9 missing image; 10 truncated depth PNG; 11 GT all out of range
  _write(path, [good[0], good[1], neg, '{"image": "broken', far, good[2], no_scale, good[3], good[4], good[5],
                empty])
  clean = tmp_path / "clean.jsonl"
  data = f"|{root / 'rgb'}|{root / 'depth'}|nyuv2"
  for proto in ("correct", "official"):
    summary = ev.main(["--baseline", "constant:2.5", "--protocol", proto, "--data", f"x={path}{data}",
                       "--coord_frame", "x=depth", "--out", str(tmp_path / proto), "--workers", "2"])
    printed = capsys.readouterr().out
    d = summary["datasets"]["x"]
    assert "skipped records:" in printed and f"{path}:4: invalid JSON" in printed
    if proto == "correct":
      assert d["skipped"] == {"bad_line": 1, "bad_coordinates": 2, "bad_record": 1, "missing_depth": 1,
                              "unreadable_image": 1, "corrupt_depth": 1, "no_valid_depth": 1}
      assert [m.split(": ", 1)[0] for m in d["skip_messages"]] == [f"{path}:{n}" for n in (3, 4, 5, 7, 8)]
      assert "1 of 6 pixel_coords lie outside the depth image 32x24" in d["skip_messages"][0]
      assert "no depth_scale" in d["skip_messages"][3] and "x: 8 skipped" in printed and "3 more" in printed
      kept = [good[0], good[1], good[2]]
    else:  # the authors' evaluator drops out-of-frame points, defaults depth_scale, scores a no-GT image 0
      assert d["skipped"] == {"bad_line": 1, "missing_depth": 1, "unreadable_image": 1, "corrupt_depth": 1}
      assert [m.split(": ", 1)[0] for m in d["skip_messages"]] == [f"{path}:{n}" for n in (4, 8, 9, 10)]
      assert f"{path}:9: " in printed and "image file not found" in printed
      kept = [good[0], good[1], neg, far, good[2], no_scale]
    _write(clean, kept)
    ref = runner.run(predictors.ConstantDepth(2.5), [runner.EvalDataset("x", str(clean), str(root / "rgb"), str(root / "depth"),
                                                        "nyuv2", "depth")],
                 tmp_path / f"clean_{proto}", protocol_name=proto, progress=False)
    got = _results_by_line(tmp_path / proto)
    assert got == _results_by_line(tmp_path / f"clean_{proto}")  # every good record: the same numbers
    for mode in ("sparse", "dense"):
      r = ref["datasets"]["x"][mode]
      if proto == "correct":
        assert d[mode]["delta1"] == r["delta1"] and d[mode]["images"] == 3 and d[mode]["empty"] == 0
      else:  # one more image (GT out of range) counted with δ1 = 0
        assert d[mode]["images"] == 7 and d[mode]["empty"] == 1
        assert d[mode]["delta1"] == pytest.approx(r["delta1"] * 6 / 7, abs=1e-12)
    if proto == "official":
      assert got[2]["sparse"]["outside"] == 1 and got[2]["sparse"]["points"] == 6  # the x = -1 point dropped
    on_disk = json.loads((tmp_path / proto / runner.SUMMARY_FILE).read_text())["datasets"]["x"]
    assert on_disk["skipped"] == d["skipped"] and on_disk["skip_messages"] == d["skip_messages"]


def test_official_sparse_ignores_masks_dense_applies_them(tmp_path):
  """The authors load the sparse GT without `mask_valid_path` / `mask_transp_path`; dense applies them."""
  root = tmp_path / "d"
  path = write_dataset(root, 1, seed=7, extra={"mask_valid_path": "mask.png"})
  mask = np.zeros((24, 32), np.uint8)
  mask[:, 16:] = 255
  Image.fromarray(mask).save(root / "depth" / "mask.png")
  ds = runner.EvalDataset("m", str(path), str(root / "rgb"), str(root / "depth"), "nyuv2", "depth")
  for proto in ("official", "correct"):
    conv = protocol.CONVENTIONS[proto]
    item = runner._load(runner.plan([ds], ("sparse", "dense"), proto)[0][0], conv)
    unmasked = rgbd.load_sample(item.record, root / "rgb", root / "depth", "nyuv2", nearest_rule=conv.nearest_rule,
                                masks=False).depth
    assert not item.sample.depth[:, :32].any() and (item.sample.depth[:, 32:] == unmasked[:, 32:]).all()
    if proto == "official":
      np.testing.assert_array_equal(item.sparse_gt, unmasked)
    else:
      assert item.sparse_gt is None  # sparse reads the masked map
