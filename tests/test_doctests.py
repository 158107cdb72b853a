"""Runs the `Examples:` (doctest) sections of the package's docstrings.

Every module of `htmuon_jax` is searched, so a new example is tested as soon
as it is written. The aliases and `spectral_power` must have one.
"""

import doctest
import importlib
import pkgutil

import pytest

import htmuon_jax

MODULES = sorted(
  m.name for m in pkgutil.walk_packages(htmuon_jax.__path__, "htmuon_jax.")
)

# Public functions whose docstring must show an example.
WITH_EXAMPLES = (
  "htmuon_jax._alias.htmuon",
  "htmuon_jax._alias.muon",
  "htmuon_jax._normuon.htnormuon",
  "htmuon_jax._adamuon.htadamuon",
  "htmuon_jax._row_norm.rmnp",
  "htmuon_jax._transform.spectral_power",
)


def doctests():
  finder = doctest.DocTestFinder(exclude_empty=True)
  tests = []
  for name in MODULES:
    tests.extend(
      t for t in finder.find(importlib.import_module(name)) if t.examples
    )
  return sorted(tests, key=lambda t: t.name)


DOCTESTS = doctests()


def test_examples_exist():
  names = {t.name for t in DOCTESTS}
  missing = [n for n in WITH_EXAMPLES if n not in names]
  assert not missing, f"no doctest examples in {missing}"


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda t: t.name)
def test_docstring_examples(test):
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  result = runner.run(test, out=print)
  assert result.attempted > 0
  assert result.failed == 0, f"{result.failed} of {result.attempted} failed"
