"""The README's Layout table matches the tree: every path it names exists, and every module of
`depthvlm_jax/`, every package folder inside it and every top-level folder is named (a folder row
names everything under it)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _layout_rows() -> list[str]:
  text = (ROOT / "README.md").read_text()
  section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
  return [line for line in section.splitlines() if line.startswith("| `")]


def _named_paths() -> set[str]:
  """Paths in the first column; `a/b.py`, `c.py` means a/b.py and a/c.py."""
  out = set()
  for row in _layout_rows():
    first = row.split("|")[1]
    folder = ""
    for name in re.findall(r"`([^`]+)`", first):
      if "/" in name.rstrip("/"):
        folder = name.rsplit("/", 1)[0] + "/" if not name.endswith("/") else ""
        out.add(name)
      else:
        out.add(folder + name)
  return out


def test_every_named_path_exists():
  missing = sorted(p for p in _named_paths() if not (ROOT / p).exists())
  assert not missing, f"README Layout names paths that do not exist: {missing}"


def test_every_module_and_folder_is_named():
  named = _named_paths()
  folders = {p for p in named if p.endswith("/")}
  want = [str(p.relative_to(ROOT)) for pkg in ("depthvlm_jax", "depthvlm_jax/model")
          for p in sorted((ROOT / pkg).glob("*.py")) if p.name != "__init__.py"]
  want += [f"{p.name}/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
           and p.name not in ("depthvlm_jax", "__pycache__", "runs", "build") and not p.name.endswith(".egg-info")]
  want += [f"depthvlm_jax/{p.name}/" for p in sorted((ROOT / "depthvlm_jax").iterdir())
           if p.is_dir() and p.name != "__pycache__"]
  want += ["main.py"]
  unnamed = [w for w in want if w not in named and not any(w.startswith(f) for f in folders if f != w)]
  assert not unnamed, f"README Layout does not name: {unnamed}"
