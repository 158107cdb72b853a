"""The coefficient designers of method="polynomial", re-derived and checked.

The checks use numpy float64 and the math the designs rest on (Chebyshev's
alternation theorem, the Newton-Schulz limit, the scalar maps written out
again here), not the designers' own evaluation code.
"""

import numpy as np
import pytest

from htmuon_jax import minimax

LOWER = minimax.lower_bound(1e-4, 64)  # 1e-4 * 64^(-1/8) ~ 5.9e-5.


def _alternations(err: np.ndarray, level: float) -> int:
  """Number of sign alternations of `err` among its near-extremal points."""
  signs = np.sign(err[np.abs(err) >= level])
  return 1 + int(np.count_nonzero(signs[1:] != signs[:-1])) if signs.size else 0


def test_minimax_fit_matches_chebyshev():
  # Best degree-<=2 approximation of x^3 on [-1, 1] is x^3 - T_3(x)/4 =
  # (3/4) x, with error exactly 1/4 (Chebyshev).
  x = np.linspace(-1.0, 1.0, 2001)
  coeffs, err = minimax.minimax_fit(np.stack([x**0, x, x**2], 1), x**3)
  np.testing.assert_allclose(coeffs, [0.0, 0.75, 0.0], atol=1e-6)
  assert abs(err - 0.25) < 1e-6


def test_polar_steps_are_minimax_and_converge():
  table = minimax.polar_express_coefficients(LOWER)
  lo, hi = LOWER, 1.0
  for i, (a, b, c) in enumerate(table[:4]):
    # Each step is the best odd quintic for "= 1" on its (safety-widened)
    # interval: by Chebyshev's theorem its error equioscillates at >= 4
    # points (3 coefficients + 1).
    top = hi * minimax.DEFAULT_SAFETY
    x = np.r_[np.geomspace(lo, top, 20001), np.linspace(lo, top, 20001)]
    x.sort()
    y = a * x + b * x**3 + c * x**5
    e = y - 1.0
    level = 0.999 * np.abs(e).max()
    assert _alternations(e, level) >= 4, i
    lo, hi = y.min(), y.max()
  # Near 1 the optimal step tends to the Newton-Schulz quintic
  # (15 x - 10 x^3 + 3 x^5) / 8, flat to second order at x = 1.
  np.testing.assert_allclose(table[-2], [15 / 8, -10 / 8, 3 / 8], atol=0.02)
  # The composition maps the whole interval to 1 within the design tol.
  s = np.geomspace(LOWER, 1.0, 50001)
  for a, b, c in table:
    s = a * s + b * s**3 + c * s**5
  assert np.abs(s - 1.0).max() <= minimax.DEFAULT_TOL


@pytest.mark.parametrize("root", [4, 8])
def test_inverse_root_steps_converge(root):
  table = minimax.inverse_root_coefficients(LOWER, root)
  h = np.geomspace(LOWER, 1.0, 50001)
  p, y = h.copy(), np.ones_like(h)
  for a, b, c in table:
    q = a + b * p + c * p * p
    y, p = y * q, q**root * p
  # y -> h^(-1/r); the design drives P^(1/r) to 1 within tol, so y has
  # relative error <= tol.
  assert np.abs(y * h**(1.0 / root) - 1.0).max() <= 2 * minimax.DEFAULT_TOL


def _pipeline(d: minimax.Design, s: np.ndarray) -> np.ndarray:
  """The method's scalar action, written out from the module docstring."""
  o = s.copy()
  for a, b, c in d.polar:
    o = a * o + b * o**3 + c * o**5
  if d.power == 0.0:
    return o
  h = s * o
  p, y = h.copy(), np.ones_like(h)
  for a, b, c in d.inverse_root:
    q = a + b * p + c * p * p
    y, p = y * q, q**d.root * p
  z = (y - d.y_range[0]) / (d.y_range[1] - d.y_range[0])
  w = sum(c * z**i for i, c in enumerate(d.power_poly))
  return h * w * o


@pytest.mark.parametrize("power", [0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 0.3, 0.77])
def test_design_composition_error(power):
  d = minimax.design(power, LOWER)
  s = np.geomspace(LOWER, 1.0, 20001)
  rel = np.abs(_pipeline(d, s) / s**power - 1.0)
  # Each stage is driven to DEFAULT_TOL; the stages' errors add up.
  assert rel.max() <= 3 * minimax.DEFAULT_TOL
  assert abs(d.error - rel.max()) <= 1e-6  # The recorded error is honest.
  # Below the interval the output fades to 0 (no blow-up, zero stays zero).
  tiny = np.r_[0.0, np.geomspace(1e-12, LOWER, 200)]
  out = _pipeline(d, tiny)
  assert out[0] == 0.0
  assert np.all(np.isfinite(out)) and np.all(out >= -1e-12)
  assert np.all(out <= 1.01 * LOWER**power + 1e-12)


def test_integer_power_is_exact_monomial():
  # p = 1/8, r = 8: w must be y^7 exactly, i.e. (y_lo + (y_hi - y_lo) z)^7,
  # whose power-basis coefficients are binomial (all positive).
  d = minimax.design(0.125, LOWER)
  y_lo, y_hi = d.y_range
  from math import comb
  expected = [comb(7, i) * y_lo**(7 - i) * (y_hi - y_lo)**i for i in range(8)]
  np.testing.assert_allclose(d.power_poly, expected, rtol=1e-6)


def test_design_is_cached_and_deterministic():
  d = minimax.design(0.3, LOWER)
  assert minimax.design(0.3, LOWER) is d
  fresh = minimax.design.__wrapped__(0.3, LOWER)
  np.testing.assert_array_equal(fresh.polar, d.polar)
  np.testing.assert_array_equal(fresh.inverse_root, d.inverse_root)
  np.testing.assert_array_equal(fresh.power_poly, d.power_poly)


def test_lower_bound_covers_gelfand_overestimate():
  # The Gelfand bound (sum s^8)^(1/8) overestimates s_max by at most
  # k^(1/8) (all singular values equal): a singular value eps * s_max is
  # then exactly at eps * k^(-1/8) after normalization.
  k, eps = 64, 1e-4
  s = np.r_[np.ones(k - 1), eps]
  c = np.sum(s**8) ** (1 / 8)
  assert eps / c >= minimax.lower_bound(eps, k)


@pytest.mark.parametrize("kwargs", [dict(power=1.5, lower=1e-4),
                                    dict(power=0.1, lower=0.0),
                                    dict(power=0.1, lower=1e-4, root=6)])
def test_design_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    minimax.design(**kwargs)
