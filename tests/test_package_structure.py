"""Structure rules of the package: its layers, its surface, its imports."""

import ast
import pathlib
import subprocess
import sys

import pytest

import htmuon_jax

PACKAGE = pathlib.Path(htmuon_jax.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))


# The one module allowed to read optax's private names (by name, with a
# tested fallback): the reference of the tests and benchmarks.
DOOR = PACKAGE / "testing.py"


def _private(dotted: str) -> bool:
  return any(
    part.startswith("_") and not part.startswith("__")
    for part in dotted.split(".")
  )


def foreign_private_uses(path: pathlib.Path) -> list[str]:
  """Private names of other packages (`optax._src`, `jax._src`) that `path` uses.

  The package's own `_`-modules are its internals (optax's `_src`
  convention) and free to use inside it; another package's private names
  can move in any release.
  """
  tree = ast.parse(path.read_text())
  bound: set[str] = set()  # names bound to other packages' modules
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split(".")[0] == "htmuon_jax":
        continue
      found += [
        f"{node.module}.{a.name}"
        for a in node.names
        if _private(f"{node.module}.{a.name}")
      ]
      bound.update(a.asname or a.name for a in node.names)
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "htmuon_jax":
          continue
        if _private(a.name):
          found.append(a.name)
        bound.add(a.asname or a.name.split(".")[0])
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in bound
      and _private(node.attr)
    ):
      found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
  return found


def test_the_checker_finds_foreign_private_uses(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(
    "import jax\n"
    "from optax._src import base\n"
    "from htmuon_jax import _numerics\n"
    "from htmuon_jax._numerics import _hidden\n"
    "y = jax._src.core\n"
  )
  assert foreign_private_uses(bad) == [
    "optax._src.base",
    "jax._src (line 5)",
  ]


@pytest.mark.parametrize(
  "path",
  [m for m in MODULES if m != DOOR],
  ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_no_module_uses_other_packages_private_names(path):
  assert foreign_private_uses(path) == []


# The layers of docs/architecture.md, bottom first: a module imports only
# modules of its own layer or below. A new module must be placed here.
LAYERS = {
  "helpers": ("_checks", "_numerics", "_minimax"),
  "layouts": ("_layouts",),
  "execution": ("sharding", "_grouping"),
  "methods": ("methods",),
  "transformations": ("_transform", "_shape_groups"),
  "optimizers": ("_alias", "_normuon", "_adamuon", "_row_norm"),
  "tools": ("diagnostics", "testing"),
}
LEVEL = {m: i for i, ms in enumerate(LAYERS.values()) for m in ms}


def top_module(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> str:
  return path.relative_to(root).parts[0].removesuffix(".py")


def upward_imports(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> list:
  """Package modules of a higher layer than `path`'s that it imports."""
  here = LEVEL[top_module(path, root)]
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    names: list[str] = []
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "htmuon_jax":
        names = [a.name for a in node.names]
      elif node.module.startswith("htmuon_jax."):
        names = [node.module.split(".")[1]]
    elif isinstance(node, ast.Import):
      names = [
        a.name.split(".")[1]
        for a in node.names
        if a.name.startswith("htmuon_jax.")
      ]
    found += [n for n in names if LEVEL.get(n, -1) > here]
  return found


def test_the_layer_checker_finds_upward_imports(tmp_path):
  (tmp_path / "_grouping.py").write_text(
    "from htmuon_jax import _alias as alias\n"
    "from htmuon_jax.methods import _base as base\n"
    "from htmuon_jax import _numerics as numerics\n"
  )
  assert upward_imports(tmp_path / "_grouping.py", tmp_path) == [
    "_alias",
    "methods",
  ]


@pytest.mark.parametrize(
  "path",
  [m for m in MODULES if m.name != "__init__.py" or m.parent != PACKAGE],
  ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_imports_go_down_the_layers(path):
  assert top_module(path) in LEVEL, "place the module in LAYERS"
  assert upward_imports(path) == []


def test_power_goes_back_up_only_into_the_method():
  # From `htmuon`'s update to the method's `apply`, the calls move down the
  # layers and back up once: from the executor into the method's step.
  import traceback

  import jax
  import jax.numpy as jnp

  from htmuon_jax.methods import _polynomial as polynomial

  stacks = []
  apply = polynomial.Polynomial.apply

  def spy(self, *args, **kwargs):
    stacks.append(traceback.extract_stack())
    return apply(self, *args, **kwargs)

  params = {"a": jnp.ones((4, 3)), "b": jnp.ones((4, 3)), "n": jnp.ones(3)}
  polynomial.Polynomial.apply = spy
  try:
    for mode in ("off", "shapes"):
      opt = htmuon_jax.htmuon(
        0.1, method="polynomial", distribute=htmuon_jax.Execution(grouping=mode)
      )
      jax.jit(opt.update)(params, opt.init(params), params)
  finally:
    polynomial.Polynomial.apply = apply
  assert stacks
  for stack in stacks:
    levels = [
      LEVEL[top_module(pathlib.Path(f.filename))]
      for f in stack
      if pathlib.Path(f.filename).is_relative_to(PACKAGE)
    ]
    files = {
      f.filename
      for f in stack
      if pathlib.Path(f.filename).is_relative_to(PACKAGE)
    }
    # issue 30's bound: htmuon -> the method's apply through <= 6 modules.
    assert len(files) <= 6, sorted(files)
    assert levels[0] == LEVEL["_alias"], levels
    ups = sum(b > a for a, b in zip(levels, levels[1:]))
    assert ups == 1, levels
    assert levels[-1] == LEVEL["methods"], levels


def test_top_level_surface_is_small():
  # The aliases and their pieces; helpers live in their modules.
  assert len(htmuon_jax.__all__) <= 30, len(htmuon_jax.__all__)
  for name in htmuon_jax.__all__:
    assert hasattr(htmuon_jax, name), name


def test_import_starts_no_backend():
  # Multi-host scripts call jax.distributed.initialize before any backend
  # starts; importing the package (its built-in method objects validate
  # their options when made) must not start one.
  code = (
    "import jax._src.xla_bridge as xb, htmuon_jax\n"
    "assert not xb._backends, sorted(xb._backends)\n"
    "print('ok')\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize(
  "path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_locals_or_global_state(path):
  # Arguments are written out (no `locals()`), and no module state changes
  # while tracing (no `global`).
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Global):
      found.append(f"global {node.names} (line {node.lineno})")
    if (
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Name)
      and node.func.id in ("locals", "vars")
    ):
      found.append(f"{node.func.id}() (line {node.lineno})")
  assert found == []
