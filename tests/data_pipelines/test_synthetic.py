"""Synthetic RGB-D: deterministic, exact depth, grounded text consistent with the rendered depth."""

import json
import os

import numpy as np

from data_pipelines import rgbd, synthetic


def test_same_seed_same_arrays():
  a = synthetic.render(synthetic.make_scene(7))
  b = synthetic.render(synthetic.make_scene(7))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[1], synthetic.render(synthetic.make_scene(8))[1])


def test_plane_at_known_depth_renders_exact_z():
  scene = synthetic.Scene("indoor", 250.0, 64, 48, [synthetic.Obj(
      "wall", "plane", np.array([0, 0, 3.7]), np.array([0, 0, -1.0]), np.ones(3, np.float32) * 100, "plain")], 0)
  _, depth, ids = synthetic.render(scene)
  assert np.all(ids == 0) and np.abs(depth - 3.7).max() < 1e-4


def test_qa_answers_agree_with_depth():
  for seed in range(6):
    scene = synthetic.make_scene(seed)
    _, depth, ids = synthetic.render(scene)
    objs = synthetic.visible_objects(scene, depth, ids)
    qa = dict(synthetic.grounded_text(scene, objs, np.random.default_rng(seed)))
    for o in objs:
      answer = qa[f"How far is the {o.name} from the camera, in meters?"]
      i = [k for k, s in enumerate(scene.objects) if s.name == o.name][0]
      assert abs(float(answer.split()[1]) - np.median(depth[ids == i])) < 0.051
    for q, a in qa.items():
      if q.startswith("Which is closer"):
        names = q[len("Which is closer to the camera, the "):-1].split(" or the ")
        d = {o.name: o.distance_m for o in objs}
        assert a.startswith(f"The {min(names, key=d.get)} is closer")


def test_written_dataset_reads_back(tmp_path):
  files = synthetic.ensure_synthetic_dataset(tmp_path, 3, 2, seed=1)
  records, errors = rgbd.read_jsonl(files["train"])
  assert len(records) == 3 and not errors
  s = rgbd.load_sample(records[0], tmp_path, tmp_path, "synthetic")
  assert s.image.shape[:2] == s.depth.shape
  assert s.depth.shape[1] >= synthetic.CANONICAL_WIDTH[0] and s.depth.shape[0] >= synthetic.CANONICAL_HEIGHT[0]
  qa = [json.loads(l) for l in files["qa"].read_text().splitlines()]
  assert qa and all(r["prompt"] and r["solution"] for r in qa)
  test_records, _ = rgbd.read_jsonl(files["test"])
  assert {r.image for r in test_records}.isdisjoint({r.image for r in records})
  mtime = os.stat(files["train"]).st_mtime
  synthetic.ensure_synthetic_dataset(tmp_path, 3, 2, seed=1)  # complete: not rewritten
  assert os.stat(files["train"]).st_mtime == mtime
