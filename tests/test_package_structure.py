"""Structure rules of the package: modules share only public names."""

import ast
import pathlib
import subprocess
import sys

import pytest

import htmuon_jax

PACKAGE = pathlib.Path(htmuon_jax.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def private_uses(path: pathlib.Path) -> list[str]:
  """`_name`s of other package modules that `path` imports or reads."""
  tree = ast.parse(path.read_text())
  aliases: set[str] = set()  # names bound to package modules
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "htmuon_jax":
        aliases.update(a.asname or a.name for a in node.names)
      elif node.module.startswith("htmuon_jax."):
        found += [
          f"{node.module}.{a.name}"
          for a in node.names
          if a.name.startswith("_") and not a.name.startswith("__")
        ]
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("htmuon_jax."):
          aliases.add(a.asname or a.name.split(".")[0])
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
    ):
      found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
  return found


def test_the_checker_finds_private_uses(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(
    "from htmuon_jax import spectral\n"
    "from htmuon_jax.numerics import _hidden\n"
    "y = spectral._helper(1)\n"
  )
  assert private_uses(bad) == [
    "htmuon_jax.numerics._hidden",
    "spectral._helper (line 3)",
  ]


@pytest.mark.parametrize(
  "path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_module_uses_another_modules_private_names(path):
  assert private_uses(path) == []


# The layers of docs/architecture.md, bottom first: a module imports only
# modules of its own layer or below. A new module must be placed here.
LAYERS = {
  "helpers": ("checks", "numerics", "minimax", "optax_compat"),
  "layouts": (
    "dimension_numbers",
    "param_tree",
    "routing",
    "flax_layouts",
    "equinox_layouts",
  ),
  "execution": ("sharding", "batching", "matrix_state"),
  "methods": ("methods",),
  "functions": ("spectral",),
  "transformations": ("transform", "shape_groups"),
  "optimizers": ("alias", "normuon", "adamuon", "row_norm"),
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
  (tmp_path / "batching.py").write_text(
    "from htmuon_jax import alias\nfrom htmuon_jax.methods import base\n"
    "from htmuon_jax import numerics\n"
  )
  assert upward_imports(tmp_path / "batching.py", tmp_path) == [
    "alias",
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

  from htmuon_jax.methods import polynomial

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
    assert levels[0] == LEVEL["alias"], levels
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
