"""The house, from the code's own imports: one-way layers, no import cycle, short files.

The package's import graph is read with `ast` (every import, at module level or inside a
function). A test fails on an import that runs back up the layers, on any cycle between files,
on a file over 450 lines, and on more than 4 modules at the package's top level besides the thin
command aliases.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "daa_jax")

# Bottom to top: a module may import its own layer's modules and those of lower layers only.
LAYERS = (
    ("errors",),
    ("data",),
    ("models",),
    ("train",),
    ("evaluate",),
    ("study",),
    ("accel",),
    ("console", "main", "plan", "bench", "scaling", "__main__"),
)
# The command aliases at the top level: `python -m daa_jax.<name>` (a few lines each).
ALIASES = ("plan", "bench", "scaling")
MAX_LINES = 450


def _modules() -> dict[str, str]:
  out = {}
  for d, _, fs in os.walk(PACKAGE):
    for f in fs:
      if f.endswith(".py"):
        p = os.path.join(d, f)
        mod = os.path.relpath(p, REPO)[:-3].replace(os.sep, ".")
        out[mod.removesuffix(".__init__")] = p
  return out


def _imports(mod: str, path: str, modules) -> set[str]:
  tree = ast.parse(open(path, encoding="utf-8").read())
  pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
  out = set()
  for n in ast.walk(tree):
    if isinstance(n, ast.Import):
      out |= {a.name for a in n.names}
    elif isinstance(n, ast.ImportFrom):
      base = n.module or ""
      if n.level:
        parts = pkg.split(".")
        base = ".".join(parts[:len(parts) - n.level + 1] + ([base] if base else []))
      out.add(base)
      out |= {f"{base}.{a.name}" for a in n.names}
  return {t for t in out if t in modules and t != mod}


def _layer(mod: str) -> int:
  if mod == "daa_jax":
    return 0  # the package's own __init__: a docstring and __version__
  parts = mod.split(".")
  name = parts[1] if len(parts) > 1 else "__init__"
  for i, names in enumerate(LAYERS):
    if name in names:
      return i
  raise AssertionError(f"{mod}: not in the layer table of tests/test_layering.py; add its "
                       "subpackage to LAYERS")


def _graph():
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_imports_run_down_the_layers():
  bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
         for m, targets in _graph().items() for t in sorted(targets) if _layer(t) > _layer(m)]
  assert not bad, "imports that run back up:\n" + "\n".join(bad)


def test_no_import_cycle():
  graph = _graph()
  index, low, stack, on, cycles = {}, {}, [], set(), []
  counter = [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      c = []
      while True:
        w = stack.pop()
        on.discard(w)
        c.append(w)
        if w == v:
          break
      if len(c) > 1:
        cycles.append(sorted(c))

  for v in graph:
    if v not in index:
      strong(v)
  assert not cycles, f"import cycles: {cycles}"


def test_the_layer_check_catches_an_import_back_up(tmp_path):
  """The checks above read real import statements (a function-level one included)."""
  p = tmp_path / "m.py"
  p.write_text("def f():\n  from daa_jax.study import sweep\n")
  modules = {"daa_jax.data.m": str(p), "daa_jax.study.sweep": "", "daa_jax.study": ""}
  got = _imports("daa_jax.data.m", str(p), modules)
  assert "daa_jax.study.sweep" in got
  assert _layer("daa_jax.study.sweep") > _layer("daa_jax.data.m")


def test_no_file_over_450_lines():
  long = sorted((sum(1 for _ in open(p, encoding="utf-8")), os.path.relpath(p, REPO))
                for p in _modules().values())
  over = [f"{path}: {n} lines" for n, path in long if n > MAX_LINES]
  assert not over, "split by what the code does:\n" + "\n".join(over)


def test_top_level_holds_subpackages_and_few_modules():
  top = sorted(f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py")
               and f not in ("__init__.py", "__main__.py"))
  modules = [m for m in top if m not in ALIASES]
  assert len(modules) <= 4, modules
  for alias in ALIASES:
    n = sum(1 for _ in open(os.path.join(PACKAGE, alias + ".py"), encoding="utf-8"))
    assert n <= 15, f"daa_jax/{alias}.py is a command alias: {n} lines"
  for sub in ("models", "data", "train", "evaluate", "study", "accel"):
    doc = ast.get_docstring(ast.parse(open(os.path.join(PACKAGE, sub, "__init__.py")).read()))
    assert doc and "Imports" in doc, f"daa_jax/{sub}/__init__.py: say what it owns and imports"
