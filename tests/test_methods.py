"""Spectral methods as objects: the registry, options, and new methods."""

import dataclasses

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import htmuon_jax
from htmuon_jax import methods
from htmuon_jax import spectral
from htmuon_jax.newton_schulz import NewtonSchulz
from htmuon_jax.streaming import Stream
from tests.reference import rel_err, spectral_power_ref

X = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)), jnp.float32)


def test_builtins_are_registered_without_side_effect_imports():
  assert set(spectral.method_names()) >= {
    "auto",
    "svd",
    "eigh",
    "newton_schulz",
    "polynomial",
    "stream",
  }
  assert spectral.STATEFUL_METHODS == ("stream",)
  assert "stream" not in spectral.METHODS
  assert set(spectral.ORDERED_METHODS) == {"auto", "svd", "eigh", "stream"}


def test_names_and_objects_with_options_agree():
  by_keyword = htmuon_jax.spectral_power(
    X, 0.0, method="newton_schulz", ns_steps=3, ns_coeffs="dion"
  )
  by_object = htmuon_jax.spectral_power(
    X, 0.0, method=NewtonSchulz(steps=3, coeffs="dion")
  )
  chex.assert_trees_all_equal(by_object, by_keyword)
  assert spectral.get_method("stream", rank=2, stream_qr="cholesky") == Stream(
    rank=2, qr="cholesky"
  )


def test_stateful_method_only_in_transformations():
  with pytest.raises(ValueError, match="stream"):
    htmuon_jax.spectral_power(X, 0.125, method=Stream(rank=2))
  tx = htmuon_jax.scale_by_spectral_power(0.125, method=Stream(rank=2))
  state = tx.init({"w": X})
  assert state.basis["w"].shape == (1, 4, 2)


@dataclasses.dataclass(frozen=True)
class Doubled(methods.SpectralMethod):
  """A test method: twice the SVD result, with its own option."""

  name = "doubled_svd"
  ordered = True
  factor: float = 2.0

  def apply(self, x, state, power, eps, values):
    out, _ = spectral.SVD().apply(x, None, power, eps, values)
    return self.factor * out, state


def test_a_new_method_is_one_class_and_one_registration():
  htmuon_jax.register_method(Doubled())
  try:
    ref = 2 * spectral_power_ref(X, 0.25)
    assert (
      rel_err(htmuon_jax.spectral_power(X, 0.25, method="doubled_svd"), ref)
      < 1e-5
    )  # fp32 SVD
    tx = htmuon_jax.scale_by_spectral_power(
      0.25, method="doubled_svd", spectrum="rank"
    )
    out, _ = tx.update({"w": X}, tx.init({"w": X}))
    assert out["w"].shape == X.shape
  finally:
    spectral._REGISTRY.pop("doubled_svd")  # pylint: disable=protected-access


def test_register_method_name_and_function_is_deprecated():
  fn = lambda x, power, eps: 3 * x
  with pytest.warns(DeprecationWarning):
    htmuon_jax.register_method("tripled", fn)
  try:
    # power-of-two scaling is undone by 2^(e * power) with power = 1/2 here.
    out = htmuon_jax.spectral_power(jnp.eye(3) * 4.0, 0.5, method="tripled")
    assert float(out[0, 0]) == pytest.approx(3 * 0.5 * 8**0.5)
    with pytest.raises(ValueError, match="spectrum"):
      htmuon_jax.spectral_power(X, 0.5, method="tripled", spectrum="rank")
  finally:
    spectral._REGISTRY.pop("tripled")  # pylint: disable=protected-access


def test_register_method_rejects_non_methods():
  with pytest.raises(ValueError, match="method"):
    htmuon_jax.register_method(object())
