"""htmuon_jax.testing's door to optax's helpers, and our fallbacks when a newer
optax no longer has the (private) name."""

import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

from htmuon_jax import testing as optax_compat

NS_COEFFS = jnp.asarray((3.4445, -4.7750, 2.0315))
PRIVATE_NS = ("optax.contrib._muon", "orthogonalize_via_newton_schulz")


def _ns_module():
  import importlib

  return importlib.import_module(PRIVATE_NS[0])


def test_the_package_imports_nothing_private_from_optax():
  import pathlib

  import htmuon_jax

  root = pathlib.Path(htmuon_jax.__file__).parent
  for path in root.rglob("*.py"):
    if path.name == "testing.py":
      continue
    text = path.read_text()
    assert "optax._src" not in text and "contrib._muon" not in text, path


@pytest.mark.parametrize(
  "shape, dims",
  [
    ((24, 16), None),
    ((16, 40), None),
    ((3, 12, 20), optax.contrib.MuonDimensionNumbers(1, 2)),
    ((6, 2, 5, 4), optax.contrib.MuonDimensionNumbers((0, 1), 3)),
  ],
)
@pytest.mark.parametrize("preconditioning", ["frobenius", "aol"])
def test_newton_schulz_fallback_gives_optax_numbers(
  monkeypatch, shape, dims, preconditioning
):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  kw = dict(ns_steps=5, preconditioning=preconditioning, dimension_numbers=dims)
  private = getattr(_ns_module(), PRIVATE_NS[1])
  want = private(x, NS_COEFFS, **kw)
  assert optax_compat.optax_name(":".join(PRIVATE_NS)) is private
  monkeypatch.delattr(_ns_module(), PRIVATE_NS[1])
  assert optax_compat.optax_name(":".join(PRIVATE_NS)) is None
  got = optax_compat.orthogonalize_via_newton_schulz(x, NS_COEFFS, **kw)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_newton_schulz_fallback_runs_every_row_of_a_table(monkeypatch):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 12)))
  table = jnp.tile(NS_COEFFS, (3, 1)) * jnp.asarray([[1.0], [0.9], [0.8]])
  want = getattr(_ns_module(), PRIVATE_NS[1])(x, table)
  monkeypatch.delattr(_ns_module(), PRIVATE_NS[1])
  got = optax_compat.orthogonalize_via_newton_schulz(x, table)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_newton_schulz_fallback_needs_dimension_numbers_beyond_2d(
  monkeypatch,
):
  monkeypatch.delattr(_ns_module(), PRIVATE_NS[1])
  with pytest.raises(ValueError, match="dimension numbers"):
    optax_compat.orthogonalize_via_newton_schulz(jnp.ones((2, 3, 4)), NS_COEFFS)
