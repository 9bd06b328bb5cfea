"""The package's structure: no import cycle at module scope, the data readers below their registry, and one
error base (``A2VError``) under every error the project raises for its users."""

import ast
import importlib
from pathlib import Path

from a2v_jax.errors import A2VError

ROOT = Path(__file__).resolve().parents[1]


def _modules():
  out = {}
  for package in ("a2v_jax", "experiments", "benchmarks"):
    for p in (ROOT / package).rglob("*.py"):
      name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
      out[name.removesuffix(".__init__")] = p
  return out


MODULES = _modules()


def _imports(path, module_scope_only=True):
  tree = ast.parse(path.read_text())
  nodes = tree.body if module_scope_only else ast.walk(tree)
  found = set()
  for n in nodes:
    if isinstance(n, ast.ImportFrom) and n.module:
      for a in n.names:
        full = f"{n.module}.{a.name}"
        found.add(full if full in MODULES else n.module)
    elif isinstance(n, ast.Import):
      found.update(a.name for a in n.names)
  return {m for m in found if m in MODULES}


def _cycles(graph):
  state, cycles = {}, []

  def visit(u, stack):
    state[u] = "open"
    stack.append(u)
    for v in sorted(graph[u]):
      if state.get(v) == "open":
        cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
      elif v not in state:
        visit(v, stack)
    stack.pop()
    state[u] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [])
  return cycles


def test_no_import_cycle_at_module_scope():
  assert not _cycles({m: _imports(p) for m, p in MODULES.items()})


def test_library_has_no_import_cycle_even_inside_functions():
  # a lazy import inside a function hides a cycle from the interpreter, not from the reader (the trainer once
  # called generate, which imported the trainer back)
  lib = {m: p for m, p in MODULES.items() if m.startswith("a2v_jax")}
  graph = {m: {v for v in _imports(p, module_scope_only=False) if v in lib} for m, p in lib.items()}
  assert not _cycles(graph)


def test_data_readers_do_not_import_their_registry():
  # what the registry dispatches to, and what they stand on (nodes.py sits above the registry)
  readers = [f"a2v_jax.data.{m}" for m in ("fsdd", "vegas", "esc50", "vggsound", "scan", "records", "audio")]
  uses = {m: "a2v_jax.data.registry" in _imports(MODULES[m], module_scope_only=False) for m in readers}
  assert not any(uses.values()), [m for m, u in uses.items() if u]


def test_every_project_error_derives_from_the_one_base():
  found = []
  for name, path in MODULES.items():
    for n in ast.parse(path.read_text()).body:
      if isinstance(n, ast.ClassDef) and n.name.endswith("Error"):
        found.append((name, n.name))
  assert len(found) >= 20
  loose = [f"{m}.{c}" for m, c in found if not issubclass(getattr(importlib.import_module(m), c), A2VError)]
  assert not loose, loose
