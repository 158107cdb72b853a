"""Property-based checks of `spectral_power` (hypothesis, bounded examples).

Invariants of `f(X) = U diag(s**p) V^T` that hold for every method up to its
documented accuracy: scale equivariance, orthogonal invariance, transpose,
`p = 1` identity, method agreement, and the paper's steepest-descent identity
(Hoelder equality for the dual Schatten norms).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import htmuon_jax
from tests.reference import matrix_with_spectrum, rel_err, spectral_power_ref

# Relative Frobenius accuracy of each method on the matrices generated here
# (condition number <= 1e2): fp32 SVD is backward stable (few ulps times a
# dimension factor); the Gram route of eigh squares the condition number; the
# polynomial method is specified to 1e-3.
METHOD_TOL = {"svd": 1e-5, "eigh": 1e-4, "polynomial": 1e-3}
METHODS = sorted(METHOD_TOL)
# The invariances (scale, orthogonal, transpose) hold for every matrix-product
# method up to fp32 rounding, whatever its distance from `U S^p V^T`:
# "express" is a few percent from it by design, but its 15 products (weights
# < 2, iterates < 3) round to ~1e-5, so 1e-4 here.
INVARIANCE_TOL = {**METHOD_TOL, "express": 1e-4}
INVARIANCE_METHODS = sorted(INVARIANCE_TOL)
POWERS = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)

SETTINGS = settings(
  max_examples=15,
  deadline=None,
  derandomize=True,
  suppress_health_check=[HealthCheck.too_slow],
)


# A few shapes (square, tall, wide, vectors) so compiled kernels are reused.
SHAPES = ((1, 6), (6, 1), (5, 5), (7, 3), (3, 8), (8, 8))


@st.composite
def matrices(draw):
  """A float64 matrix with a random spectrum of condition number <= 1e2."""
  m, n = draw(st.sampled_from(SHAPES))
  seed = draw(st.integers(0, 2**31 - 1))
  log_cond = draw(st.floats(0.0, 2.0))
  rng = np.random.default_rng(seed)
  k = min(m, n)
  s = np.sort(10.0 ** -rng.uniform(0, log_cond, k))[::-1]
  s[0] = 1.0
  return matrix_with_spectrum(rng, m, n, s)


def _f(x, power, method):
  return np.asarray(
    htmuon_jax.spectral_power(
      jnp.asarray(x, jnp.float32), power, method=method
    ),
    np.float64,
  )


@pytest.mark.parametrize("method", INVARIANCE_METHODS)
@SETTINGS
@given(
  x=matrices(), power=st.sampled_from(POWERS), log2_c=st.floats(-10.0, 10.0)
)
def test_scale_equivariance(method, x, power, log2_c):
  c = 2.0**log2_c
  lhs, rhs = _f(c * x, power, method), c**power * _f(x, power, method)
  assert rel_err(lhs, rhs) < 2 * INVARIANCE_TOL[method]


@pytest.mark.parametrize("method", INVARIANCE_METHODS)
@SETTINGS
@given(x=matrices(), power=st.sampled_from(POWERS), seed=st.integers(0, 999))
def test_orthogonal_invariance(method, x, power, seed):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((x.shape[0],) * 2))
  r, _ = np.linalg.qr(rng.standard_normal((x.shape[1],) * 2))
  lhs = _f(q @ x @ r, power, method)
  rhs = q @ _f(x, power, method) @ r
  assert rel_err(lhs, rhs) < 2 * INVARIANCE_TOL[method]


@pytest.mark.parametrize("method", INVARIANCE_METHODS)
@SETTINGS
@given(x=matrices(), power=st.sampled_from(POWERS))
def test_transpose(method, x, power):
  assert rel_err(_f(x.T, power, method), _f(x, power, method).T) < (
    2 * INVARIANCE_TOL[method]
  )


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(x=matrices(), power=st.sampled_from(POWERS))
def test_matches_reference(method, x, power):
  assert (
    rel_err(_f(x, power, method), spectral_power_ref(x, power))
    < (METHOD_TOL[method])
  )


@SETTINGS
@given(x=matrices())
def test_power_one_is_identity_also_when_traced(x):
  xf = jnp.asarray(x, jnp.float32)
  np.testing.assert_array_equal(htmuon_jax.spectral_power(xf, 1.0), xf)
  traced = jax.jit(lambda a, p: htmuon_jax.spectral_power(a, p, method="svd"))
  assert rel_err(traced(xf, jnp.float32(1.0)), x) < 1e-5


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(x=matrices(), power=st.sampled_from(POWERS[1:-1]))
def test_hoelder_equality(method, x, power):
  """<X, f(X)> = ||X||_{S_(1+p)} ||f(X)||_{S_(1+1/p)}: f(X) is the steepest
  descent direction under the Schatten-(1 + 1/p) norm (paper, section 3)."""
  fx = _f(x, power, method)
  s_x = np.linalg.svd(x, compute_uv=False)
  s_f = np.linalg.svd(fx, compute_uv=False)
  inner = float(np.sum(x * fx))
  q = 1.0 + 1.0 / power
  dual = np.sum(s_x ** (1 + power)) ** (1 / (1 + power)) * (
    np.sum(s_f**q) ** (1 / q)
  )
  assert abs(inner - dual) <= 4 * METHOD_TOL[method] * abs(dual)


@SETTINGS
@given(x=matrices(), power=st.sampled_from(POWERS))
def test_methods_agree(x, power):
  outs = {m: _f(x, power, m) for m in METHODS}
  for m in METHODS:
    assert rel_err(outs[m], outs["svd"]) < METHOD_TOL[m] + METHOD_TOL["svd"]
