"""The house drawn from imports (../shared/DESIGN.md): no module of ul2x imports itself
back through others (imports inside functions count), no module imports a job, and
tests/ and bench/ do not import each other."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = [p for p in ROOT.rglob("*.py")
           if p.relative_to(ROOT).parts[0] not in {"tests", "bench", "build", "runs"}
           and not p.relative_to(ROOT).parts[0].startswith(".")]
# The jobs, by module: each is run, never imported (export's CLI runs its job module).
JOBS = {"ul2x.train", "ul2x.infer", "ul2x.eval", "ul2x.lm_eval", "ul2x.import_hf",
        "ul2x.export.job", "ul2x.export.__main__"}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(("ul2x",) + (parts[:-1] if parts[-1] == "__init__" else parts))


MODULES = {module_name(p): p for p in PACKAGE}


def imported(path: pathlib.Path) -> set[str]:
  """The ul2x modules `path` imports anywhere in it (a `from m import x` names the
  module m.x where that is a module, else m)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
               else node.module for a in node.names]
    else:
      continue
    for name in names:
      while name not in MODULES and "." in name:  # `import ul2x.a.b` imports ul2x.a too
        name = name.rsplit(".", 1)[0]
      if name in MODULES and name != "ul2x":
        found.add(name)
  return found


GRAPH = {name: imported(path) - {name} for name, path in MODULES.items()}


def test_no_import_circle():
  done, stack = set(), []

  def visit(name):
    if name in stack:
      return stack[stack.index(name):] + [name]
    if name in done:
      return None
    stack.append(name)
    for other in sorted(GRAPH[name]):
      circle = visit(other)
      if circle:
        return circle
    stack.pop()
    done.add(name)
    return None

  for name in sorted(GRAPH):
    circle = visit(name)
    assert circle is None, " -> ".join(circle)


def test_no_module_imports_a_job():
  assert JOBS <= set(MODULES), JOBS - set(MODULES)
  importers = {name: sorted(GRAPH[name] & JOBS) for name in GRAPH}
  importers["ul2x.export.__main__"] = sorted(set(importers["ul2x.export.__main__"])
                                             - {"ul2x.export.job"})
  assert not {k: v for k, v in importers.items() if v}


def test_tests_and_benches_do_not_import_each_other():
  local = {"tests": {p.stem for p in (ROOT / "tests").glob("*.py")},
           "bench": {p.stem for p in (ROOT / "bench").glob("*.py")}}
  for folder, other in (("tests", "bench"), ("bench", "tests")):
    for path in (ROOT / folder).glob("*.py"):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
          names = [node.module]
        else:
          continue
        for name in names:
          top = name.removeprefix("ul2x.").split(".")[0]
          assert top != other and not (top in local[other] and top not in local[folder]), (
              f"{path.relative_to(ROOT)} imports {name}")
