"""The weight designer of method="polynomial", re-derived and checked.

The checks use numpy float64 and the math the design rests on (Chebyshev's
alternation theorem, the fixed quintic written out again here), not the
designer's own evaluation code.
"""

import numpy as np
import pytest

from htmuon_jax import _minimax as minimax

LOWER = 1e-3  # Spectra spanning 1e3: the method's accurate interval.


def _scalar(d: minimax.Design, s: np.ndarray) -> np.ndarray:
  """The method's scalar action, written out from the module docstring."""
  x, acc, extra = s.copy(), d.w[0] * s, 0.0
  for j in range(d.steps):
    a = x * x
    extra = extra + d.b[j] * a + d.c[j] * a * a
    x = 2.5 * x - 2.5 * x**3 + x**5
    acc = acc + d.w[j + 1] * x
  return acc + extra * x


def test_minimax_fit_matches_chebyshev():
  # Best degree-<=2 approximation of x^3 on [-1, 1] is x^3 - T_3(x)/4 =
  # (3/4) x, with error exactly 1/4 (Chebyshev).
  x = np.linspace(-1.0, 1.0, 2001)
  coeffs, err = minimax.minimax_fit(np.stack([x**0, x, x**2], 1), x**3)
  np.testing.assert_allclose(coeffs, [0.0, 0.75, 0.0], atol=1e-6)
  assert abs(err - 0.25) < 1e-6


def test_minimax_fit_weighted_relative_error():
  # Relative minimax fit of sqrt(x) on [1/4, 1] by a + b x: the optimum
  # equioscillates at 3 points (2 coefficients + 1), both ends included.
  x = np.linspace(0.25, 1.0, 4001)
  c, err = minimax.minimax_fit(
    np.stack([x**0, x], 1), np.sqrt(x), 1.0 / np.sqrt(x)
  )
  e = (c[0] + c[1] * x) / np.sqrt(x) - 1.0
  assert abs(np.abs(e).max() - err) < 1e-9
  ext = np.abs(e) >= 0.999 * err
  assert ext[0] and ext[-1]
  signs = np.sign(e[ext])
  assert np.count_nonzero(signs[1:] != signs[:-1]) >= 2


@pytest.mark.parametrize("power", [0.0, 1 / 16, 1 / 8, 0.3, 1 / 2, 0.9])
def test_rederived_design_meets_its_error(power):
  # Re-derived on a small grid (fast), checked on a 20x finer one.
  d = minimax.design.__wrapped__(power, LOWER, points=300)
  s = np.r_[
    np.geomspace(LOWER, minimax.DEFAULT_TOP, 20001),
    np.linspace(LOWER, minimax.DEFAULT_TOP, 6001),
  ]
  rel = np.abs(_scalar(d, s) / s**power - 1.0)
  # The design's target plus what the small grid can miss between points.
  assert rel.max() <= 2 * minimax.DEFAULT_TOL, rel.max()
  assert abs(d.error - rel.max()) <= 0.5 * minimax.DEFAULT_TOL
  # Within the budget: 2 x the 30 products-worth of Muon's NS5 on a square
  # matrix (3 per step there too).
  assert d.matmuls == 3 * d.steps + 1 <= 30
  # Small weights: fp32 rounding of the iterates is not amplified.
  assert max(np.abs(d.w).max(), np.abs(d.b).max(), np.abs(d.c).max()) < 10


def test_below_interval_fades_to_zero():
  d = minimax.design(0.125, LOWER)
  tiny = np.r_[0.0, np.geomspace(1e-12, LOWER, 400)]
  out = _scalar(d, tiny)
  assert out[0] == 0.0 and np.all(np.isfinite(out))
  # Odd and ~linear below the interval: s = 1e-6 maps to ~1e-6 / LOWER of
  # the value at LOWER, not to (1e-6)^p.
  assert np.all(np.abs(out) <= 1.01 * LOWER**0.125)
  assert abs(_scalar(d, np.array([1e-6]))[0]) < 0.01 * (1e-6) ** 0.125


def test_fixed_quintic_is_stable_up_to_top():
  # Inputs up to DEFAULT_TOP (scale estimate a little low) must converge to
  # 1, not diverge: F's repelling fixed point is sqrt(3/2).
  x = np.linspace(1.0, minimax.DEFAULT_TOP, 101)
  for _ in range(30):
    x = 2.5 * x - 2.5 * x**3 + x**5
  np.testing.assert_allclose(x, 1.0, atol=1e-12)
  assert minimax.DEFAULT_TOP < np.sqrt(1.5)


@pytest.mark.parametrize("lower", [1e-3, 3e-3, 0.05, 0.5, 0.9])
def test_every_interval_has_a_design(lower):
  # Every cutoff in (0, 1) maps to lower = max(eps, 1e-3): none may fail
  # (the LP used to fail at small intervals); a narrower one needs fewer
  # steps.
  d = minimax.design.__wrapped__(0.125, lower, points=300)
  assert d.error <= minimax.DEFAULT_TOL
  assert d.steps <= minimax.design(0.125, LOWER).steps


def test_design_is_cached_and_deterministic():
  d = minimax.design(0.3, LOWER)
  assert minimax.design(0.3, LOWER) is d
  fresh = minimax.design.__wrapped__(0.3, LOWER)
  np.testing.assert_array_equal(fresh.w, d.w)
  np.testing.assert_array_equal(fresh.b, d.b)
  np.testing.assert_array_equal(fresh.c, d.c)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(power=1.5, lower=1e-3),
    dict(power=0.1, lower=0.0),
    dict(power=0.1, lower=1e-3, top=1.3),
    dict(power=0.1, lower=1e-3, tol=0.0),
  ],
)
def test_design_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    minimax.design(**kwargs)
