"""The web demo (`python -m depthvlm_jax.demo`) in a real browser, and its request checks.

The browser test starts the demo CLI on 127.0.0.1 with a tiny random DepthVLM, runs the `predict` CLI
on the same image and model at the same time, and drives Debian's headless chromium with playwright:
bad uploads give their message and the page keeps working; the depth map, colour bar and answer
appear; the downloaded .npy (and the PNG and PLY) equal `predict`'s byte for byte; a clicked pixel
reports the .npy's depth there; two browsers submitting at once both get answers from the program
compiled for that bucket; the page makes no request beyond the demo server.

Set DEPTHVLM_DEMO_SCREENSHOT=docs/demo.png to (re)write the README's screenshot.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from data_pipelines import rgbd, synthetic
from depthvlm_jax import demo, predict
from depthvlm_jax.evaluation import outputs

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this file out

REPO = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--enable-unsafe-swiftshader", "--use-angle=swiftshader"]  # software WebGL for the 3-D view
FX = 600.0  # focal length typed into the page and given to predict (keeps the processed image small)


def _huge_png(path: pathlib.Path, w: int = 60000, h: int = 60000) -> None:
  """A PNG whose header claims w x h pixels (only a header and an empty image stream; a few bytes)."""
  import struct
  import zlib

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------------
# Request checks (no browser)


def test_read_upload_messages(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / "ok.png")
  np.testing.assert_array_equal(demo.read_upload(tmp_path / "ok.png"), rgbd.load_rgb(tmp_path / "ok.png"))
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "notes.txt").write_text("not pixels")
  _huge_png(tmp_path / "huge.png")
  _huge_png(tmp_path / "big.png", 8000, 6000)  # under PIL's bomb limit, over the demo's
  (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
  for name, message in [("empty.png", "empty.png: empty file"), ("notes.txt", "notes.txt: not an image"),
                        ("huge.png", "huge.png: enormous image"), ("big.png", "enormous image \\(8000 x 6000"),
                        ("cut.png", "cut.png: the image is damaged"), ("gone.png", "did not arrive")]:
    with pytest.raises(demo.DemoError, match=message):
      demo.read_upload(tmp_path / name)
  with pytest.raises(demo.DemoError, match="No image"):
    demo.read_upload(None)


def test_focal_length_and_canonical_size_checks():
  assert demo.focal_px(demo.FOV, 60, 640, 480) == predict.default_fx(640)  # predict's default camera
  assert demo.focal_px(demo.FOV, 90, 640, 480) == pytest.approx(320.0)
  assert demo.focal_px(demo.FX, 500, 640, 480) == 500.0
  for mode, value, message in [(demo.FX, 0, "positive"), (demo.FOV, None, "positive"), (demo.FOV, 180, "0 and 180"),
                               (demo.FX, 5, "too short")]:
    with pytest.raises(demo.DemoError, match=message):
      demo.focal_px(mode, value, 640, 480)


def test_glb_point_cloud_and_model_choice(tmp_path):
  import trimesh
  points = np.random.default_rng(0).normal(size=(1001, 3)).astype(np.float32)
  colours = np.arange(3003, dtype=np.uint8).reshape(1001, 3)
  assert demo.write_glb(tmp_path / "c.glb", points, colours, max_points=500) == 334  # every 3rd point
  cloud = trimesh.load(tmp_path / "c.glb", force="scene").to_geometry()
  np.testing.assert_allclose(cloud.vertices, points[::3] * [1, -1, -1], rtol=1e-6)  # y up, looking down -z
  np.testing.assert_array_equal(cloud.colors[:, :3], colours[::3])
  # --model wins; else the newest default run that holds a checkpoint.
  run = tmp_path / "stage1"
  (run / "checkpoints" / "1280").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  assert demo.choose_model("/some/model", tmp_path)[0] == "/some/model"
  path, note = demo.choose_model(None, tmp_path, [str(tmp_path / "stage2"), str(run)])
  assert path == str(run) and "trained default run" in note


# ---------------------------------------------------------------------------------------------------
# The page in a browser


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: pathlib.Path, timeout: float = 180.0) -> None:
  end = time.time() + timeout
  while time.time() < end:
    if proc.poll() is not None:
      pytest.fail(f"demo server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    try:
      with urllib.request.urlopen(url, timeout=2) as r:
        if r.status == 200:
          return
    except OSError:
      time.sleep(0.5)
  pytest.fail(f"demo server did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _upload(page, path: pathlib.Path) -> str:
  """Puts a file into the upload box (clearing the previous one); returns the status line it gives."""
  clear = page.locator("#upload button[aria-label='Clear']")
  if clear.count():
    clear.click()
    page.locator("#upload input[type=file]").wait_for(state="attached")
  page.locator("#upload input[type=file]").set_input_files(str(path))
  page.wait_for_function(f"document.querySelector('#status').innerText.includes({json.dumps(path.name)})")
  return page.locator("#status").inner_text()


def _run(page) -> str:
  page.locator("#run").click()
  page.wait_for_function("/Done in|Error/.test(document.querySelector('#status').innerText)", timeout=180_000)
  return page.locator("#status").inner_text()


def _set_camera(page, fx: float) -> None:
  page.locator("#fx-mode").get_by_label(demo.FX).check()
  page.locator("#fx-value input").fill(repr(fx))


def test_demo_in_browser(tmp_path):
  if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
      pytest.fail(f"{CHROMIUM} missing in CI (.ci/run installs Debian's chromium package)")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI installs it")
  from playwright.sync_api import sync_playwright

  t0 = time.time()
  model, note = demo.choose_model(None, tmp_path, [str(tmp_path / "no_such_run")])  # no --model, no trained run
  assert "tiny randomly initialised" in note and (pathlib.Path(model) / "model.safetensors").exists()
  scene = synthetic.make_scene(3, "indoor")
  rgb = synthetic.render(scene)[0]
  h, w = rgb.shape[:2]
  Image.fromarray(rgb).save(tmp_path / "room.png")
  (tmp_path / "notes.txt").write_text("not pixels")
  (tmp_path / "empty.png").write_bytes(b"")
  _huge_png(tmp_path / "huge.png")

  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
             GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = tmp_path / "server.log"
  with open(log, "w") as f:
    server = subprocess.Popen([sys.executable, "-m", "depthvlm_jax.demo", "--model", str(model), "--port", str(port),
                               "--out", str(tmp_path / "served")], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
  with open(tmp_path / "predict.log", "w") as f:
    reference = subprocess.Popen([sys.executable, "-m", "depthvlm_jax.predict", "--model", str(model), "--image",
                                  str(tmp_path / "room.png"), "--fx", repr(FX), "--out", str(tmp_path / "predicted")],
                                 cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
  try:
    _wait_for_server(url, server, log)
    with sync_playwright() as pw:
      browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
      outside = []

      def local_only(route):  # the page must work with nothing but the demo server
        if route.request.url.startswith(url):
          route.continue_()
        else:
          outside.append(route.request.url)
          route.abort()

      pages = []
      for _ in range(2):
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        context.route("**/*", local_only)
        context.set_default_timeout(30_000)
        pages.append(context.new_page())
      page, other = pages
      page.goto(url)
      assert str(model) in page.locator("#model-note").inner_text()  # names the model it serves

      # Bad uploads: a message on the page, no work done, and the page stays usable.
      for name, message in [("notes.txt", "not an image"), ("empty.png", "empty file"), ("huge.png", "enormous image")]:
        status = _upload(page, tmp_path / name)
        assert "Error" in status and message in status, status
      status = _run(page)  # pressing the button with the bad file shows the same message
      assert "Error" in status and "enormous image" in status, status

      # A good upload: depth map, colour bar, answer and files from one request.
      assert f"{w} x {h}" in _upload(page, tmp_path / "room.png")
      _set_camera(page, FX)
      status = _run(page)
      assert "Done in" in status and "compiled a new program" in status, status
      assert reference.wait(timeout=300) == 0, (tmp_path / "predict.log").read_text()[-3000:]
      ref = tmp_path / "predicted"
      answer = page.locator("#answer textarea").input_value()
      assert answer and answer == json.loads((ref / "room.json").read_text())["text"]
      img = page.locator("#depth img")
      # the status can read "Done" while the browser is still fetching and decoding the map
      page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle())
      assert img.evaluate("e => [e.naturalWidth, e.naturalHeight]") == [w, h]
      depth = np.load(ref / "room_depth.npy")
      lo, hi = outputs.percentile_range(depth)
      bar = page.locator("#colourbar-scale")
      assert float(bar.get_attribute("data-lo")) == pytest.approx(lo, rel=1e-5)
      assert float(bar.get_attribute("data-hi")) == pytest.approx(hi, rel=1e-5)

      # Downloads equal predict's files byte for byte.
      with page.expect_download() as download:
        page.locator("#downloads a[download='room_depth.npy']").click()
      got = tmp_path / "downloaded.npy"
      download.value.save_as(got)
      assert got.read_bytes() == (ref / "room_depth.npy").read_bytes()
      for name in ("room_depth.png", "room.ply"):
        href = page.locator(f"#downloads a[download='{name}']").get_attribute("href")
        assert page.request.get(href).body() == (ref / name).read_bytes(), name

      # The depth at a clicked pixel is the .npy's value there.
      box = img.bounding_box()
      want_x, want_y = w * 3 // 4, h // 3
      img.click(position={"x": (want_x + 0.5) * box["width"] / w, "y": (want_y + 0.5) * box["height"] / h})
      page.wait_for_function("document.querySelector('#clicked').innerText.includes('Pixel (')")
      clicked = page.locator("#clicked").inner_text()
      x, y, value = re.search(r"x=(\d+), y=(\d+)\): depth ([\d.]+) m", clicked).groups()
      x, y = int(x), int(y)
      assert abs(x - want_x) <= 1 and abs(y - want_y) <= 1, clicked
      assert float(value) == pytest.approx(float(depth[y, x]), abs=5e-5), clicked

      # An example scene fills in the upload and its true focal length.
      page.locator("tr", has_text="outdoor_scene_11.png").first.click()
      page.wait_for_function("document.querySelector('#status').innerText.includes('outdoor_scene_11.png')")
      fx = float(page.locator("#fx-value input").input_value())
      assert fx == round(synthetic.make_scene(11, "outdoor").fx, 2)

      # Two browsers at once: both are answered, by the program already compiled for this bucket.
      other.goto(url)
      _upload(other, tmp_path / "room.png")
      _set_camera(other, FX)
      _upload(page, tmp_path / "room.png")
      _set_camera(page, FX)
      for p in pages:
        p.locator("#run").click()
      for p in pages:
        p.wait_for_function("document.querySelector('#status').innerText.includes('Done in')", timeout=180_000)
        assert "reused the compiled program" in p.locator("#status").inner_text()
        assert p.locator("#answer textarea").input_value() == answer
      assert server.poll() is None, "the server stopped"
      assert not outside, f"the page requested {outside}"

      shot = os.environ.get("DEPTHVLM_DEMO_SCREENSHOT")
      if shot:
        img.click(position={"x": (want_x + 0.5) * box["width"] / w, "y": (want_y + 0.5) * box["height"] / h})
        page.wait_for_function("document.querySelector('#clicked').innerText.includes('Pixel (')")
        page.locator("#cloud canvas").wait_for()
        page.wait_for_timeout(3000)  # the viewer loads the .glb and renders
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        im = Image.open(tmp_path / "page.png").convert("RGB")
        im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.LANCZOS)
        im.quantize(128, method=Image.Quantize.MEDIANCUT).save(REPO / shot, optimize=True)
      browser.close()
  finally:
    for proc in (server, reference):
      if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)
  print(f"browser test: {time.time() - t0:.0f} s")
