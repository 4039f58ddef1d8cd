"""Procedural RGB-D scenes: the embedded default dataset (no downloads, deterministic from a seed).

Indoor rooms (floor, ceiling, walls, furniture boxes, spheres) and outdoor streets (ground, building
blocks, vehicles, sky beyond the range = invalid) are ray-cast with a pinhole camera of varied focal
length and image size. Depth is exact z-depth in metres. Each scene keeps its object list, from
which grounded text is written: a caption and spatial QA (which object is closer, how far an object
is, which is bigger), only about visible objects.

Camera frame: x right, y down, z forward; the camera sits at the origin.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from etils import epath
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40),
           "white": (230, 230, 230), "orange": (230, 120, 30), "purple": (140, 50, 170), "grey": (120, 120, 120)}
INDOOR_CLASSES = ("box", "cabinet", "table", "ball")
OUTDOOR_CLASSES = ("car", "van", "truck")
# The canonical camera (focal unification) and the size range of its images: a little larger
# than the default preset's 96x128 bucket, so that one crop sees nearly the whole scene (horizon,
# floor, far wall) instead of a fragment. Rendered images stay about 180-460 px wide.
CANONICAL_FX = 150.0
CANONICAL_WIDTH = (136, 165)
CANONICAL_HEIGHT = (100, 125)
MAX_RANGE = 80.0


@dataclasses.dataclass
class Obj:
  name: str  # e.g. "red box"
  kind: str  # "box" | "sphere" | "plane"
  centre: np.ndarray
  size: np.ndarray  # box: full extents (x, y, z); sphere: (r, r, r)
  colour: np.ndarray
  pattern: str  # "checker" | "stripes" | "noise" | "plain"
  nameable: bool = True  # mentioned in text (floors, walls, buildings are not)


@dataclasses.dataclass
class Scene:
  kind: str  # "indoor" | "outdoor"
  fx: float
  width: int
  height: int
  objects: list[Obj]
  seed: int


def _rand_colour(rng):
  name = rng.choice(list(COLOURS))
  return name, np.asarray(COLOURS[name], np.float32)


def make_scene(seed: int, kind: str | None = None) -> Scene:
  """A random scene; camera size chosen so that its canonical image is CANONICAL_WIDTH x CANONICAL_HEIGHT."""
  rng = np.random.default_rng(seed)
  kind = kind or ("indoor" if rng.random() < 0.5 else "outdoor")
  fx = float(rng.uniform(200, 420))
  width = int(np.ceil(rng.uniform(*CANONICAL_WIDTH) * fx / CANONICAL_FX))
  height = int(np.ceil(rng.uniform(*CANONICAL_HEIGHT) * fx / CANONICAL_FX))
  objs: list[Obj] = []
  used = set()

  def name_for(cls):
    for _ in range(20):
      cname, colour = _rand_colour(rng)
      if (cname, cls) not in used:
        used.add((cname, cls))
        return f"{cname} {cls}", colour
    return f"{cls} {len(used)}", np.asarray((128, 128, 128), np.float32)

  if kind == "indoor":
    cam_h, half_w, depth_room = rng.uniform(1.2, 1.7), rng.uniform(1.8, 3.5), rng.uniform(4.0, 9.0)
    ceil = cam_h - rng.uniform(2.4, 3.0)
    wall_c = np.asarray(rng.uniform(150, 230, 3), np.float32)
    objs += [Obj("floor", "plane", np.array([0, cam_h, 0.0]), np.array([0, -1, 0.0]),
                 np.asarray(rng.uniform(80, 160, 3), np.float32), "checker", False),
             Obj("ceiling", "plane", np.array([0, ceil, 0.0]), np.array([0, 1, 0.0]), wall_c * 0.9, "plain", False),
             Obj("back wall", "plane", np.array([0, 0, depth_room]), np.array([0, 0, -1.0]), wall_c, "stripes", False),
             Obj("left wall", "plane", np.array([-half_w, 0, 0.0]), np.array([1, 0, 0.0]), wall_c * 0.95, "plain", False),
             Obj("right wall", "plane", np.array([half_w, 0, 0.0]), np.array([-1, 0, 0.0]), wall_c * 0.85, "plain",
                 False)]
    for _ in range(rng.integers(2, 5)):
      cls = str(rng.choice(INDOOR_CLASSES))
      name, colour = name_for(cls)
      z = rng.uniform(1.5, depth_room - 0.6)
      x = rng.uniform(-half_w + 0.6, half_w - 0.6)
      if cls == "ball":
        r = rng.uniform(0.15, 0.45)
        objs.append(Obj(name, "sphere", np.array([x, cam_h - r, z]), np.full(3, r), colour, "plain"))
      else:
        sx, sy, sz = rng.uniform(0.4, 1.2), rng.uniform(0.4, 1.6), rng.uniform(0.4, 1.0)
        objs.append(Obj(name, "box", np.array([x, cam_h - sy / 2, z]), np.array([sx, sy, sz]), colour,
                        str(rng.choice(["plain", "noise", "stripes"]))))
  else:
    cam_h = rng.uniform(1.4, 2.2)
    objs.append(Obj("road", "plane", np.array([0, cam_h, 0.0]), np.array([0, -1, 0.0]),
                    np.asarray((70, 70, 75), np.float32), "noise", False))
    street = rng.uniform(6, 12)
    for side in (-1, 1):
      z = rng.uniform(3, 10)
      while z < 70:
        b_len, b_height, b_depth = rng.uniform(6, 15), rng.uniform(6, 25), rng.uniform(6, 12)
        objs.append(Obj("building", "box", np.array([side * (street + b_depth / 2), cam_h - b_height / 2,
                                                     z + b_len / 2]),
                        np.array([b_depth, b_height, b_len]), np.asarray(rng.uniform(90, 200, 3), np.float32),
                        "stripes", False))
        z += b_len + rng.uniform(1, 6)
    for _ in range(rng.integers(2, 5)):
      cls = str(rng.choice(OUTDOOR_CLASSES))
      name, colour = name_for(cls)
      dims = {"car": (1.8, 1.5, 4.3), "van": (2.0, 2.1, 5.0), "truck": (2.5, 3.2, 8.0)}[cls]
      x = rng.uniform(-street + 1.5, street - 1.5)
      z = rng.uniform(5, 45)
      objs.append(Obj(name, "box", np.array([x, cam_h - dims[1] / 2, z]), np.asarray(dims, np.float64), colour,
                      "plain"))
  return Scene(kind, fx, width, height, objs, seed)


def _texture(obj: Obj, p: np.ndarray, rng_phase: float) -> np.ndarray:
  if obj.pattern == "checker":
    u, v = (p[:, 0] + 100) // 0.5, (p[:, 2] + 100) // 0.5
    return np.where((u + v) % 2 == 0, 1.0, 0.7)[:, None]
  if obj.pattern == "stripes":
    return (0.8 + 0.2 * np.sin(p[:, 1] * 6 + p[:, 0] * 3 + rng_phase))[:, None]
  if obj.pattern == "noise":
    return (0.85 + 0.15 * np.sin(p[:, 0] * 17.0 + rng_phase) * np.cos(p[:, 2] * 13.0 + p[:, 1] * 7.0))[:, None]
  return np.ones((p.shape[0], 1))


def render(scene: Scene):
  """Ray-casts the scene. Returns (rgb uint8 (H, W, 3), depth float32 (H, W) metres, object ids (H, W))."""
  h, w, f = scene.height, scene.width, scene.fx
  u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
  dirs = np.stack([(u - w / 2) / f, (v - h / 2) / f, np.ones_like(u)], -1).reshape(-1, 3)  # z-component 1
  n = dirs.shape[0]
  best_t = np.full(n, np.inf)
  best_id = np.full(n, -1)
  normals = np.zeros((n, 3))
  for i, o in enumerate(scene.objects):
    if o.kind == "plane":
      denom = dirs @ o.size
      with np.errstate(divide="ignore", invalid="ignore"):
        t = ((o.centre @ o.size) / denom)
      t = np.where((denom < -1e-9) & (t > 1e-6), t, np.inf)
      nrm = np.broadcast_to(o.size, (n, 3))
    elif o.kind == "sphere":
      r = o.size[0]
      b = dirs @ o.centre
      a = np.sum(dirs * dirs, 1)
      disc = b * b - a * (o.centre @ o.centre - r * r)
      t = np.where(disc > 0, (b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
      t = np.where(t > 1e-6, t, np.inf)
      nrm = dirs * np.where(np.isfinite(t), t, 0.0)[:, None] - o.centre
      nrm = nrm / np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-9)
    else:
      lo, hi = o.centre - o.size / 2, o.centre + o.size / 2
      with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = lo / dirs, hi / dirs
      tmin = np.nanmax(np.minimum(t1, t2), 1)
      tmax = np.nanmin(np.maximum(t1, t2), 1)
      t = np.where((tmax >= tmin) & (tmin > 1e-6), tmin, np.inf)
      hit = dirs * np.where(np.isfinite(t), t, 0)[:, None]
      rel = (hit - o.centre) / (o.size / 2)
      axis = np.argmax(np.abs(rel), 1)
      nrm = np.zeros((n, 3))
      nrm[np.arange(n), axis] = np.sign(rel[np.arange(n), axis])
    closer = t < best_t
    best_t = np.where(closer, t, best_t)
    best_id = np.where(closer, i, best_id)
    normals = np.where(closer[:, None], nrm, normals)
  depth = np.where(np.isfinite(best_t), best_t, 0.0)  # dirs have z = 1, so t is the z-depth
  depth = np.where(depth <= MAX_RANGE, depth, 0.0)
  points = dirs * depth[:, None]
  light = np.array([-0.4, -1.0, -0.5])
  light /= np.linalg.norm(light)
  rgb = np.zeros((n, 3))
  sky = np.array([150, 190, 235.0]) if scene.kind == "outdoor" else np.array([20, 20, 20.0])
  for i, o in enumerate(scene.objects):
    m = (best_id == i) & (depth > 0)
    if not m.any():
      continue
    shade = 0.35 + 0.65 * np.clip(np.abs(normals[m] @ light), 0, 1)[:, None]
    rgb[m] = o.colour * _texture(o, points[m], float(i)) * shade
  rgb[depth == 0] = sky
  ids = np.where(depth > 0, best_id, -1)
  return (np.clip(rgb, 0, 255).astype(np.uint8).reshape(h, w, 3), depth.astype(np.float32).reshape(h, w),
          ids.reshape(h, w))


@dataclasses.dataclass
class VisibleObject:
  name: str
  distance_m: float  # median z-depth of the visible pixels
  pixels: int
  volume_m3: float


def visible_objects(scene: Scene, depth: np.ndarray, ids: np.ndarray, min_pixels: int = 60) -> list[VisibleObject]:
  out = []
  for i, o in enumerate(scene.objects):
    m = ids == i
    if o.nameable and m.sum() >= min_pixels:
      vol = float(np.prod(o.size)) if o.kind == "box" else float(4 / 3 * np.pi * o.size[0]**3)
      out.append(VisibleObject(o.name, float(np.median(depth[m])), int(m.sum()), vol))
  return out


def grounded_text(scene: Scene, objs: list[VisibleObject], rng: np.random.Generator) -> list[tuple[str, str]]:
  """A caption and spatial QA pairs (question, answer) about the visible objects."""
  place = "an indoor room" if scene.kind == "indoor" else "a street"
  if objs:
    names = [f"a {o.name}" for o in sorted(objs, key=lambda o: o.distance_m)]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    caption = f"The image shows {place} with {listing}, from nearest to farthest."
  else:
    caption = f"The image shows {place}."
  qa = [("Describe this image.", caption)]
  for o in objs:
    qa.append((f"How far is the {o.name} from the camera, in meters?", f"About {o.distance_m:.1f} meters."))
  if len(objs) >= 2:
    a, b = rng.choice(len(objs), 2, replace=False)
    oa, ob = objs[a], objs[b]
    near = oa if oa.distance_m < ob.distance_m else ob
    qa.append((f"Which is closer to the camera, the {oa.name} or the {ob.name}?",
               f"The {near.name} is closer ({near.distance_m:.1f} m vs "
               f"{max(oa.distance_m, ob.distance_m):.1f} m)."))
    big = oa if oa.volume_m3 > ob.volume_m3 else ob
    same = abs(oa.volume_m3 - ob.volume_m3) < 0.05 * max(oa.volume_m3, ob.volume_m3)
    qa.append((f"Which is bigger, the {oa.name} or the {ob.name}?",
               "They are about the same size." if same else f"The {big.name} is bigger."))
  return qa


def write_synthetic_dataset(out_dir: str | pathlib.Path, num_train: int, num_test: int, seed: int = 0):
  """Writes rgb/, depth/ (uint16 mm), train.jsonl, test.jsonl, qa.jsonl, qa_test.jsonl. Returns paths."""
  out = epath.Path(out_dir)
  (out / "rgb").mkdir(parents=True, exist_ok=True)
  (out / "depth").mkdir(parents=True, exist_ok=True)
  files = {}
  for split, start, count in (("train", seed * 1_000_003, num_train), ("test", seed * 1_000_003 + 500_000, num_test)):
    rgbd_lines, qa_lines = [], []
    for k in range(count):
      s = start + k
      scene = make_scene(s)
      rgb, depth, ids = render(scene)
      name = f"{split}_{k:05d}"
      with (out / "rgb" / f"{name}.png").open("wb") as f:
        Image.fromarray(rgb).save(f, format="PNG")
      with (out / "depth" / f"{name}.png").open("wb") as f:
        Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(f, format="PNG")
      size = [scene.width, scene.height]
      common = {"image": f"rgb/{name}.png", "original_rgb_size": size, "original_fx": scene.fx,
                "original_fy": scene.fx, "original_cx": scene.width / 2, "original_cy": scene.height / 2,
                "canonical_fx": CANONICAL_FX,
                "canonical_size": [round(scene.width * CANONICAL_FX / scene.fx),
                                   round(scene.height * CANONICAL_FX / scene.fx)]}
      rgbd_lines.append(dict(common, depth_path=f"depth/{name}.png", depth_scale=1000.0,
                             original_depth_size=size, depth_type="z_depth", scene_kind=scene.kind))
      for q, a in grounded_text(scene, visible_objects(scene, depth, ids), np.random.default_rng(s)):
        qa_lines.append(dict(common, prompt=q, solution=a))
    files[split] = out / f"{split}.jsonl"
    files["qa" if split == "train" else "qa_test"] = out / ("qa.jsonl" if split == "train" else "qa_test.jsonl")
    files[split].write_text("".join(json.dumps(r) + "\n" for r in rgbd_lines))
    files["qa" if split == "train" else "qa_test"].write_text("".join(json.dumps(r) + "\n" for r in qa_lines))
  return files


def ensure_synthetic_dataset(out_dir: str | pathlib.Path, num_train: int, num_test: int, seed: int = 0):
  """Writes the dataset unless a complete one with the same parameters is already there."""
  out = epath.Path(out_dir)
  manifest = out / "manifest.json"
  params = {"num_train": num_train, "num_test": num_test, "seed": seed, "version": 2}
  names = {"train": "train.jsonl", "test": "test.jsonl", "qa": "qa.jsonl", "qa_test": "qa_test.jsonl"}
  if manifest.exists() and json.loads(manifest.read_text()) == params:
    return {k: out / v for k, v in names.items()}
  files = write_synthetic_dataset(out, num_train, num_test, seed)
  manifest.write_text(json.dumps(params))  # written last: marks the set complete
  return files
