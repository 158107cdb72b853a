"""Structure rules of the package: modules share only public names."""

import ast
import pathlib

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
