"""The project's import graph: no cycles, and the layers point one way.

Every module of `depthvlm_jax/`, `data_pipelines/` and `configs/` (plus `main.py`) is parsed with
`ast`, function-local imports included, and each import of a project module becomes an edge. Layers,
bottom up: `depthvlm_jax.model` / `depthvlm_jax.processing`, then `data_pipelines` and
`depthvlm_jax.runs` (a run on disk), then `depthvlm_jax.train` / `depthvlm_jax.evaluation` and the
command-line modules; nothing points back up, evaluation does not import training, and nothing that
`pip install .` installs imports the top-level `configs` folder (it is not installed).
"""

from __future__ import annotations

import ast
import pathlib

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("depthvlm_jax", "data_pipelines", "configs")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  found = {"main": ROOT / "main.py"}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      found[_module_name(path)] = path
  return found


def _is_package(path: pathlib.Path) -> bool:
  return path.name == "__init__.py"


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
  """Project modules that `name` imports anywhere in its body (module level or inside functions)."""
  package = name if _is_package(path) else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import sub` imports the submodule `pkg.sub` when there is one, else a name of `pkg`.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in modules:  # `import a.b.c` of a name inside a module
        target = target.rpartition(".")[0]
      # A package's `__init__` is no edge (importing a submodule runs it too), unless the package is a
      # program (`__main__.py`): then importing it is importing the program.
      if target and target != name and (not _is_package(modules[target]) or f"{target}.__main__" in modules):
        out.add(target)
  return out


def import_graph() -> nx.DiGraph:
  modules = _modules()
  graph = nx.DiGraph()
  graph.add_nodes_from(modules)
  for name, path in modules.items():
    graph.add_edges_from((name, target) for target in _imports(name, path, modules))
  return graph


def _clis(modules) -> set[str]:
  """Top-level `depthvlm_jax` modules run as programs (`python -m depthvlm_jax.X`), and `main`. A
  top-level package run as one (`depthvlm_jax/X/__main__.py`) counts whole: the package and every
  module in it."""
  out = {"main"}
  for name, path in modules.items():
    if name.count(".") == 1 and name.startswith("depthvlm_jax.") and 'if __name__ == "__main__"' in path.read_text():
      out.add(name)
    if name.count(".") == 2 and name.startswith("depthvlm_jax.") and name.endswith(".__main__"):
      program = name.rpartition(".")[0]
      out.update(m for m in modules if _in(m, (program,)))
  return out


def _in(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_graph_sees_function_local_imports():
  graph = import_graph()
  assert graph.number_of_nodes() > 40
  # `evaluation.loading` imports the run's checkpoints inside a function only.
  assert graph.has_edge("depthvlm_jax.evaluation.loading", "depthvlm_jax.runs.checkpoints")
  assert graph.has_edge("main", "depthvlm_jax.train.trainer")


def test_no_import_cycles():
  cycles = sorted(nx.simple_cycles(import_graph()), key=len)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_layers_point_down():
  graph = import_graph()
  clis = _clis(_modules())
  upper = ("depthvlm_jax.train", "depthvlm_jax.evaluation")
  rules = [  # (importer prefixes, forbidden import prefixes, CLIs forbidden too?)
      (("depthvlm_jax.model", "depthvlm_jax.processing"), ("data_pipelines", "configs") + upper, True),
      (("data_pipelines",), upper + ("configs",), True),
      (("depthvlm_jax.runs",), ("configs",) + upper, True),
      (("depthvlm_jax.evaluation",), ("depthvlm_jax.train", "configs"), True),
      # installed modules, the CLIs among them, never import the top-level `configs` folder
      (("depthvlm_jax",), ("configs",), False),
  ]
  bad = []
  for importers, forbidden, no_clis in rules:
    for a, b in graph.edges:
      if _in(a, importers) and (_in(b, forbidden) or (no_clis and b in clis)):
        bad.append(f"{a} -> {b}")
  assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))
  assert "depthvlm_jax.evaluate" in clis and "depthvlm_jax.predict" in clis
  assert {"depthvlm_jax.aot", "depthvlm_jax.aot.cli", "depthvlm_jax.aot.report"} <= clis
