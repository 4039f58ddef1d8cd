"""Prediction outputs: PLY round trip, back-projection geometry, 16-bit PNG, Turbo colours."""

import numpy as np
from PIL import Image

from depthvlm_jax.evaluation import outputs


def test_ply_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  depth = rng.uniform(0.5, 4, (7, 9)).astype(np.float32)
  depth[2, 3] = 0  # invalid pixels are not written
  depth[5, :] = np.nan
  rgb = rng.integers(0, 255, (7, 9, 3), dtype=np.uint8)
  points, colours = outputs.backproject(depth, outputs.intrinsics(9, 7, 5.0), rgb)
  outputs.write_ply(tmp_path / "c.ply", points, colours)
  p, c = outputs.read_ply(tmp_path / "c.ply")
  assert len(p) == 7 * 9 - 1 - 9
  np.testing.assert_array_equal(p, points)
  np.testing.assert_array_equal(c, colours)
  assert p.dtype == np.float32 and c.dtype == np.uint8
  header = (tmp_path / "c.ply").read_bytes()[:200].decode("ascii", "replace")
  assert "binary_little_endian" in header and f"element vertex {len(p)}" in header


def test_plane_back_projects_to_the_plane():
  h, w, fx, cx, cy = 60, 80, 70.0, 41.3, 29.7
  normal = np.array([0.2, -0.3, 1.0])
  normal /= np.linalg.norm(normal)
  offset = 2.5  # plane: normal . X = offset
  v, u = np.mgrid[0:h, 0:w]
  rays = np.stack([(u + 0.5 - cx) / fx, (v + 0.5 - cy) / fx, np.ones_like(u, float)], -1)
  depth = offset / (rays @ normal)  # z of the ray's intersection with the plane
  points, _ = outputs.backproject(depth.astype(np.float32), outputs.intrinsics(w, h, fx, cx=cx, cy=cy))
  assert len(points) == h * w
  assert np.abs(points.astype(np.float64) @ normal - offset).max() < 1e-4
  # constant depth: a fronto-parallel plane at exactly that z
  flat, _ = outputs.backproject(np.full((h, w), 1.75, np.float32), outputs.intrinsics(w, h, fx))
  assert np.abs(flat[:, 2] - 1.75).max() < 1e-6
  assert abs(flat[:, 0].mean()) < 1e-5 and abs(flat[:, 1].mean()) < 1e-5  # principal point at the centre


def test_depth_png_and_turbo(tmp_path):
  depth = np.array([[0.0, 1.2345, 65.6], [np.inf, 0.001, 3.0]], np.float32)
  outputs.save_depth_png_mm(tmp_path / "d.png", depth)
  back = np.asarray(Image.open(tmp_path / "d.png"))
  assert back.dtype == np.uint16 and back.shape == (2, 3)
  np.testing.assert_array_equal(back, [[0, 1234, 65535], [0, 1, 3000]])
  c = outputs.turbo(np.linspace(0, 1, 256))
  assert c.shape == (256, 3) and c.dtype == np.uint8
  # Turbo runs blue -> green -> red, dark at both ends
  assert c[25].argmax() == 2 and c[128].argmax() == 1 and c[230].argmax() == 0
  assert c[0].max() < 80 and c[255].max() < 160 and c[128].max() > 200
  vis = outputs.side_by_side(np.zeros((2, 3, 3), np.uint8), depth)
  assert vis.shape == (2, 6, 3) and (vis[0, 3] == 0).all() and (vis[1, 3] == 0).all()  # invalid = black


def test_large_point_cloud_keeps_every_sth_pixel_on_its_own_ray(tmp_path):
  """An image over the point cap writes a grid subsample whose points are exactly the full cloud's
  points at those pixels (same rays), and never more than the cap."""
  rng = np.random.default_rng(0)
  h, w = 97, 130
  depth = rng.uniform(0.5, 9.0, (h, w)).astype(np.float32)
  rgb = rng.integers(0, 255, (h, w, 3), np.uint8)
  k = np.array([[110.0, 0, 61.3], [0, 105.0, 47.9], [0, 0, 1]])
  cap = 1000
  s = outputs.point_stride((h, w), cap)
  assert s > 1 and -(-h // s) * -(-w // s) <= cap < -(-h // (s - 1)) * -(-w // (s - 1))
  n = outputs.write_ply_from_depth(tmp_path / "sub.ply", depth, k, rgb, max_points=cap)
  points, colours = outputs.read_ply(tmp_path / "sub.ply")
  assert n == len(points) <= cap
  full_points, full_colours = outputs.backproject(depth, k, rgb)
  on_grid = ((np.arange(h)[:, None] % s == 0) & (np.arange(w)[None, :] % s == 0)).reshape(-1)
  np.testing.assert_allclose(points, full_points[on_grid], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(colours, full_colours[on_grid])
  assert outputs.point_stride((h, w), 0) == 1 and outputs.point_stride((h, w), h * w) == 1
