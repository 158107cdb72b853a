"""optax's own muon tests, from the installed optax, run against htmuon_jax.

Drop-in means optax's assertions hold unchanged: `contrib/_muon_test.py`
runs with `htmuon_jax.muon` in place of `optax.contrib.muon` (every other
name of `_muon`, e.g. `MuonDimensionNumbers`, stays optax's), and
`contrib/_common_test.py` runs its muon entry, and one for `htmuon`, with
the factories taken from this package. Only the list of optimizers under
test is narrowed (to ours); no test or assertion is changed.
"""

import pathlib
import types

from optax import contrib as optax_contrib
from optax.contrib import _muon as optax_muon

import htmuon_jax

CONTRIB = pathlib.Path(optax_contrib.__file__).parent


def _load(name: str, edit=lambda source: source) -> types.ModuleType:
  """Executes optax's test module `contrib/<name>.py` as a fresh module."""
  path = CONTRIB / f"{name}.py"
  module = types.ModuleType(f"optax_contrib_{name}")
  module.__file__ = str(path)
  code = compile(edit(path.read_text()), str(path), "exec")
  exec(code, module.__dict__)
  return module


class _MuonUnderTest(types.ModuleType):
  """optax's `_muon` module with `muon` taken from this package."""

  muon = staticmethod(htmuon_jax.muon)

  def __getattr__(self, name: str):
    return getattr(optax_muon, name)


_muon_test = _load("_muon_test")
_muon_test._muon = _MuonUnderTest("_muon")
MuonTest = _muon_test.MuonTest

# `_common_test` lists every contrib optimizer; keep its muon entry, add
# htmuon with the same settings.
_LISTS = "_MAIN_OPTIMIZERS_UNDER_TEST = tuple(_MAIN_OPTIMIZERS_UNDER_TEST)\n"
_OURS = """
_HTMUON = ({"opt_name": "htmuon", "opt_kwargs": {"learning_rate": 1e-2},
            "wrapper_name": None, "wrapper_kwargs": None},)
_ALL_OPTIMIZERS_UNDER_TEST = tuple(
    o for o in _ALL_OPTIMIZERS_UNDER_TEST if o["opt_name"] == "muon"
) + _HTMUON
_MAIN_OPTIMIZERS_UNDER_TEST = tuple(
    o for o in _MAIN_OPTIMIZERS_UNDER_TEST if o["opt_name"] == "muon"
) + _HTMUON
"""


def _narrow(source: str) -> str:
  assert _LISTS in source, "optax's _common_test.py changed its lists"
  return source.replace(_LISTS, _LISTS + _OURS)


_common_test = _load("_common_test", _narrow)
# `_get_opt_factory` looks the factories up on `contrib` when called.
_common_test.contrib = types.SimpleNamespace(
  muon=htmuon_jax.muon, htmuon=htmuon_jax.htmuon
)
ContribTest = _common_test.ContribTest


def test_every_optax_muon_test_is_collected():
  # 32 tests in optax 0.2.8's _muon_test.py; none may be lost by the load.
  names = [n for n in dir(MuonTest) if n.startswith("test")]
  assert len(names) >= 32, names
