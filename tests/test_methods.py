"""Spectral methods as objects: names, options, new methods, flat keywords."""

import dataclasses
import warnings

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import htmuon_jax
from htmuon_jax import methods
from htmuon_jax.methods import _newton_schulz as newton_schulz
from tests.reference import rel_err, spectral_power_ref

X = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)), jnp.float32)


def test_names_and_objects_with_options_agree():
  by_keyword = htmuon_jax.spectral_power(
    X,
    0.0,
    method=methods.from_keywords("newton_schulz", ns_steps=3, ns_coeffs="dion"),
  )
  by_object = htmuon_jax.spectral_power(
    X, 0.0, method=methods.NewtonSchulz(steps=3, coeffs="dion")
  )
  chex.assert_trees_all_equal(by_object, by_keyword)


def test_the_newton_schulz_module_is_not_shadowed_by_its_function():
  # The README's method table: `newton_schulz.NewtonSchulz(steps=3)`.
  got = htmuon_jax.spectral_power(
    X, 0.0, method=htmuon_jax.methods._newton_schulz.NewtonSchulz(steps=3)
  )
  want = newton_schulz.newton_schulz(X, ns_steps=3)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_method_object_keeps_its_own_options():
  m = methods.NewtonSchulz(steps=2)
  assert methods.from_keywords(m, ns_steps=7) is m


def test_flat_keywords_are_validated_whatever_the_method():
  with pytest.raises(ValueError, match="ns_steps"):
    methods.from_keywords("svd", ns_steps=0)
  with pytest.raises(TypeError, match="no registered method"):
    methods.from_keywords("svd", not_an_option=1)
  # Options that are not optax's flat keywords live on the method objects.
  for moved in ("rank", "stream_qr", "stream_side", "precision"):
    with pytest.raises(TypeError, match="no registered method"):
      methods.from_keywords("stream", **{moved: None})


def test_stateful_method_only_in_transformations():
  with pytest.raises(ValueError, match="stream"):
    htmuon_jax.spectral_power(X, 0.125, method=methods.Stream(rank=2))
  tx = htmuon_jax.scale_by_spectral_power(0.125, method=methods.Stream(rank=2))
  state = tx.init({"w": X})
  assert state.basis["w"].shape == (1, 4, 2)


@dataclasses.dataclass(frozen=True)
class Scaled(methods.SpectralMethod):
  """A test method: a multiple of the SVD result, with its own option."""

  name = "scaled_svd"
  ordered = True
  keyword_options = {"svd_factor": "factor"}
  factor: float = 2.0

  def apply(self, x, state, power, eps, values):
    out, _ = methods.SVD().apply(x, None, power, eps, values)
    return self.factor * out, state


def test_a_new_method_is_one_class_and_one_registration():
  htmuon_jax.methods.register_method(Scaled())
  try:
    ref = 2 * spectral_power_ref(X, 0.25)
    got = htmuon_jax.spectral_power(X, 0.25, method="scaled_svd")
    assert rel_err(got, ref) < 1e-5  # fp32 SVD
    tx = htmuon_jax.scale_by_spectral_power(
      0.25, method="scaled_svd", spectrum="rank"
    )
    out, _ = tx.update({"w": X}, tx.init({"w": X}))
    assert out["w"].shape == X.shape
    # Its declared keyword sets its option by name ...
    assert methods.from_keywords("scaled_svd", svd_factor=3.0).factor == 3.0
    # ... and is reported as ignored where it does not run.
    assert methods.ignored_keywords(["svd"], {"svd_factor": 3.0}) == [
      "svd_factor"
    ]
  finally:
    htmuon_jax.methods.unregister_method("scaled_svd")
  with pytest.raises(ValueError, match="unknown"):
    htmuon_jax.spectral_power(X, 0.25, method="scaled_svd")


def test_built_in_methods_cannot_be_unregistered():
  with pytest.raises(ValueError, match="built in"):
    htmuon_jax.methods.unregister_method("svd")
  with pytest.raises(ValueError, match="not registered"):
    htmuon_jax.methods.unregister_method("no_such_method")


def test_register_method_rejects_non_methods():
  with pytest.raises(ValueError, match="method"):
    htmuon_jax.methods.register_method(object())


def test_interval_step_uses_newton_schulz_options_without_warning():
  # The interval steps run Newton-Schulz, which takes ns_steps.
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    htmuon_jax.htadamuon(0.01, method="svd", interval=5, ns_steps=3)
  with pytest.warns(UserWarning, match="^ns_steps is ignored"):
    htmuon_jax.htadamuon(0.01, method="svd", ns_steps=3)


@pytest.mark.parametrize("name", ["htmuon", "htnormuon", "htadamuon"])
def test_every_method_taking_alias_takes_a_precision_object(name):
  params = {"w": X}
  fast_ns = methods.NewtonSchulz(precision="fast")
  # Newton-Schulz computes U V^T only: power 0.
  opt = htmuon_jax.ALIASES[name](0.01, power=0.0, method=fast_ns)
  fast, _ = opt.update(params, opt.init(params), params)
  opt = htmuon_jax.ALIASES[name](0.01, power=0.0, method="newton_schulz")
  plain, _ = opt.update(params, opt.init(params), params)
  # bfloat16 products: close to, but not, optax's numbers.
  assert not np.array_equal(fast["w"], plain["w"])
  chex.assert_trees_all_close(fast, plain, rtol=0.1, atol=1e-3)


def test_dual_norm_skips_non_matrix_leaves():
  updates = {"w": X, "b": jnp.arange(1.0, 5.0)}
  tx = htmuon_jax.scale_by_htmuon(0.0, method="svd", adaptive=True)
  out, _ = tx.update(updates, tx.init(updates))
  plain = htmuon_jax.scale_by_htmuon(0.0, method="svd")
  want, _ = plain.update(updates, plain.init(updates))
  # A vector's momentum passes through unscaled, as the docstring says.
  chex.assert_trees_all_close(out["b"], want["b"])
  assert not np.allclose(out["w"], want["w"])
