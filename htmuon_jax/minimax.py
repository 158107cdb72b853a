"""Design of the polynomial coefficients behind `method="polynomial"`.

Everything here is numpy float64 run once per configuration (and cached):
minimax fits by linear programming (scipy's HiGHS) on dense grids, then a
scalar simulation of the whole matrix iteration that measures the error of
the design and the ranges later stages must cover. No coefficient is typed
in; `design(power, lower)` derives all of them from the power and the lower
end of the singular-value interval.

The matrix pipeline in `htmuon_jax.polynomial` acts on every singular value
`s` in (0, 1] of the normalized input independently, so its accuracy is that
of the scalar maps designed here:

1. Polar stage (Polar Express, Amsel et al. 2025): odd quintics
   `x -> a x + b x^3 + c x^5`, each the minimax approximation of 1 on the
   current interval `[lo, hi]` (greedy), drive `s` in `[lower, 1]` to 1. While
   the interval is wide each fit covers `[lo, safety * hi]` so that rounding
   which pushes a value slightly above `hi` cannot make the next step diverge.
2. Root stage (coupled inverse `r`-th root, Guo & Higham 2006): on
   `h = s f(s)` (`f` the polar composition), `P_0 = h, y_0 = 1`,
   `q_t = a + b P_t + c P_t^2`, `y <- y q_t`, `P <- q_t^r P` keeps
   `P = y^r h`; each `q_t` is the minimax fit of `x q(x^r) = 1` for
   `x = P^(1/r)` on the current interval, so `P -> 1` and `y -> h^(-1/r)`.
3. Power stage: `h^p = h * y^(r (1 - p))`, with `y^n` replaced by its
   relative minimax polynomial on the range `y` takes, written in the
   variable `z = (y - y_lo) / (y_hi - y_lo)` in [0, 1] so that any real `p`
   works (for `r p` an integer it is `y^n` exactly).

References:
  Amsel, Persson, Musco, Gower, `The Polar Express: Optimal Matrix Sign
  Methods and Their Application to the Muon Algorithm
  <https://arxiv.org/abs/2505.16932>`_, 2025.
  Guo, Higham, `A Schur-Newton Method for the Matrix p-th Root and its
  Inverse <https://doi.org/10.1137/050643374>`_, SIAM J. Matrix Anal. Appl.,
  2006.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

# Root order of the coupled iteration. 8 keeps `y` in a narrow range
# ([1, ~5] for lower ~ 4e-5) so the power polynomial stays low-degree, and
# makes the paper's p = 1/8 (and every p = j/8) an exact integer power.
DEFAULT_ROOT = 8
# Scalar accuracy each stage is driven to: a few times the round-off of one
# fp32 matrix product (~1e-6), far below the 1e-3 target of the method.
DEFAULT_TOL = 3e-6
# Fits cover [lo, SAFETY * hi] while an interval is wide (Polar Express).
DEFAULT_SAFETY = 1.01
_MAX_STEPS = 40
_MAX_DEGREE = 24


def minimax_fit(basis: np.ndarray, target: np.ndarray,
                weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
  """Weighted minimax fit by linear programming.

  Args:
    basis: `(n_points, n_coeffs)` values of the basis functions on a grid.
    target: `(n_points,)` values to approximate.
    weight: `(n_points,)` positive weights (`1 / target` for relative error);
      ones if omitted.

  Returns:
    `(coeffs, err)` minimizing `err = max |weight * (basis @ coeffs - target)|`
    over the grid.

  Raises:
    ValueError: if the linear program fails.
  """
  basis = np.asarray(basis, np.float64)
  target = np.asarray(target, np.float64)
  weight = np.ones_like(target) if weight is None else np.asarray(weight)
  coeffs = np.zeros(basis.shape[1])
  err = np.inf
  # Iterative refinement: the LP solver works to ~1e-7 of its variables'
  # scale, so each pass re-fits the remaining residual, in its own scale.
  for _ in range(4):
    delta = _lp_fit(basis, target - basis @ coeffs, weight)
    new = coeffs + delta
    new_err = float(np.max(np.abs(weight * (basis @ new - target))))
    if new_err >= err:
      break
    coeffs, err = new, new_err
    if err > 1e-5 or err < 1e-13:  # The solver's precision is enough.
      break
  return coeffs, err


def _lp_fit(basis: np.ndarray, target: np.ndarray,
            weight: np.ndarray) -> np.ndarray:
  from scipy import optimize  # Design time only: keep package import light.

  n, k = basis.shape
  scale = max(float(np.max(np.abs(weight * target))), 1e-300)
  b = weight[:, None] * basis
  t = weight * target / scale
  ones = np.ones((n, 1))
  # Variables (coeffs, err): minimize err s.t. -err <= b c - t <= err.
  res = optimize.linprog(
      c=np.r_[np.zeros(k), 1.0],
      A_ub=np.block([[b, -ones], [-b, -ones]]),
      b_ub=np.r_[t, -t],
      bounds=[(None, None)] * k + [(0.0, None)],
      method="highs")
  if res.status != 0:
    raise ValueError(f"minimax_fit: linear program failed: {res.message}")
  return res.x[:k] * scale


def _grid(lo: float, hi: float, n: int = 300) -> np.ndarray:
  """Geometric + linear grid: resolves both ends of a wide interval."""
  return np.unique(np.r_[np.geomspace(lo, hi, n), np.linspace(lo, hi, n)])


def _quintic(c: np.ndarray, x: np.ndarray) -> np.ndarray:
  return x * (c[0] + c[1] * x**2 + c[2] * x**4)


def _root_map(c: np.ndarray, x: np.ndarray, r: int) -> np.ndarray:
  # x = P^(1/r) -> x q(x^r), with q(P) = a + b P + c P^2.
  return x * (c[0] + c[1] * x**r + c[2] * x**(2 * r))


def _greedy_steps(basis, apply, lower: float, tol: float,
                  safety: float) -> np.ndarray:
  """Greedy minimax steps driving [lower, 1] to 1 within `tol`.

  Each step fits `apply(c, x) ~ 1` (linear in `c`, with basis functions
  `basis(x)`) on the current interval and maps the interval through it.
  """
  lo, hi = lower, 1.0
  coeffs = []
  for _ in range(_MAX_STEPS):
    wide = max(1.0 - lo, hi - 1.0) > 1e-3
    top = hi * safety if wide else hi
    x = _grid(lo, top)
    c, _ = minimax_fit(basis(x).T, np.ones_like(x))
    y = apply(c, _grid(lo, top, 4000))  # Image of the fitted interval.
    coeffs.append(c)
    lo, hi = float(y.min()), float(y.max())
    if max(1.0 - lo, hi - 1.0) <= tol:
      return np.array(coeffs)
  raise ValueError(f"no convergence to {tol} from lower={lower}.")


@functools.lru_cache(maxsize=64)
def polar_express_coefficients(
    lower: float, *, tol: float = DEFAULT_TOL, safety: float = DEFAULT_SAFETY
) -> np.ndarray:
  """`(steps, 3)` odd-quintic coefficients mapping [lower, 1] to 1 +- tol.

  Step `t` is `X <- a X + (b A + c A^2) X` with `A = X X^T`.
  """
  return _greedy_steps(lambda x: np.stack([x, x**3, x**5]), _quintic,
                       lower, tol, safety)


@functools.lru_cache(maxsize=64)
def inverse_root_coefficients(
    lower: float, r: int = DEFAULT_ROOT, *, tol: float = DEFAULT_TOL,
    safety: float = DEFAULT_SAFETY
) -> np.ndarray:
  """`(steps, 3)` coefficients of `q_t(P) = a + b P + c P^2` (coupled root).

  With `P_0 = H` (eigenvalues in [lower, 1]) and `Y_0 = I`, the steps
  `Y <- Y q_t(P)`, `P <- q_t(P)^r P` drive `P` to `I` within `tol` (in the
  `r`-th root of its eigenvalues), so `Y -> H^(-1/r)`.
  """
  return _greedy_steps(
      lambda x: np.stack([x, x**(r + 1), x**(2 * r + 1)]),
      lambda c, x: _root_map(c, x, r), lower**(1.0 / r), tol, safety)


@dataclasses.dataclass(frozen=True)
class Design:
  """All coefficients of the polynomial method for one (power, lower).

  Attributes:
    power: the exponent `p`.
    lower: singular values in `[lower, 1]` (after normalization) are mapped
      to `s**p` within `error` (relative).
    root: root order `r` of the coupled iteration.
    polar: `(steps, 3)` Polar Express quintics.
    inverse_root: `(steps, 3)` coupled inverse-root quadratics (empty for
      `power == 0`, which stops after the polar stage).
    y_range: `(y_lo, y_hi)`, the range of `y` (eigenvalues of `Y`) over all
      `s` in [0, 1]; the power polynomial's variable is scaled from it.
    power_poly: power-basis coefficients (lowest first) of `w(z) ~ y**n`,
      `n = r (1 - p)`, `z = (y - y_lo) / (y_hi - y_lo)` in [0, 1].
    error: max relative error of the whole scalar composition on
      `[lower, 1]`, measured in float64 by `scalar_map`.
  """
  power: float
  lower: float
  root: int
  polar: np.ndarray
  inverse_root: np.ndarray
  y_range: tuple[float, float]
  power_poly: np.ndarray
  error: float


def _power_polynomial(n: float, y_lo: float, y_hi: float,
                      tol: float) -> np.ndarray:
  """Lowest-degree relative minimax `w(z) ~ y**n` on [y_lo, y_hi]."""
  y = _grid(y_lo, y_hi)
  t = (2.0 * y - (y_lo + y_hi)) / (y_hi - y_lo)
  # Degree floor(n) cannot fit a non-integer power; start there.
  for degree in range(int(n), _MAX_DEGREE + 1):
    # Chebyshev basis for a well-conditioned LP; converted after the fit.
    c, err = minimax_fit(np.polynomial.chebyshev.chebvander(t, degree),
                         y**n, y**-n)
    if err <= tol:
      # Power basis in z = (t + 1) / 2 = (y - y_lo) / (y_hi - y_lo) in
      # [0, 1], where the coefficients of y**n are all positive (exactly so
      # for an integer n): evaluating them in fp32 then sums positive terms,
      # without the cancellation a basis centred in the interval suffers.
      poly = np.polynomial.Chebyshev(c).convert(
          kind=np.polynomial.Polynomial, domain=[-1.0, 1.0], window=[-1.0, 1.0])
      return (poly(np.polynomial.Polynomial([-1.0, 2.0]))).coef
  raise ValueError(f"no polynomial of degree <= {_MAX_DEGREE} fits y**{n}.")


def scalar_map(design: Design, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The method's action on singular values `s` (normalized, in [0, 1]).

  Returns:
    `(out, y)`: the output singular values (`~ s**p` on [lower, 1]) and the
    eigenvalues of `Y` at the end of the root stage.
  """
  s = np.asarray(s, np.float64)
  f = np.ones_like(s)  # Polar factor's singular values: x = s f.
  x = s.copy()
  for c in design.polar:
    x = _quintic(c, x)
  f = np.divide(x, s, out=np.zeros_like(s), where=s > 0)
  if design.power == 0.0:
    return x, np.ones_like(s)
  h = s * x  # Eigenvalues of H = sym(O X^T).
  p, y = h.copy(), np.ones_like(s)
  for c in design.inverse_root:
    q = c[0] + c[1] * p + c[2] * p * p
    y, p = y * q, q**design.root * p
  y_lo, y_hi = design.y_range
  z = (y - y_lo) / (y_hi - y_lo)
  w = np.polynomial.polynomial.polyval(z, design.power_poly)
  del f
  return h * w * x, y


@functools.lru_cache(maxsize=256)
def design(power: float, lower: float, *, root: int = DEFAULT_ROOT,
           tol: float = DEFAULT_TOL) -> Design:
  """Derives (and caches) every coefficient for `s**power` on [lower, 1].

  Args:
    power: exponent in [0, 1].
    lower: lower end of the interval of normalized singular values that
      must be accurate, in (0, 1).
    root: root order of the coupled iteration.
    tol: accuracy each stage is driven to.

  Returns:
    A `Design`.

  Raises:
    ValueError: for arguments out of range.
  """
  power, lower = float(power), float(lower)
  if not 0.0 <= power <= 1.0:
    raise ValueError(f"power must be in [0, 1], got {power}.")
  if not 0.0 < lower < 1.0:
    raise ValueError(f"lower must be in (0, 1), got {lower}.")
  if root < 2 or root & (root - 1):
    raise ValueError(f"root must be a power of two >= 2, got {root}.")
  polar = polar_express_coefficients(lower, tol=tol)
  empty = np.zeros((0, 3))
  if power == 0.0:
    d = Design(power, lower, root, polar, empty, (1.0, 1.0), np.ones(1), 0.0)
  else:
    # H's eigenvalues s f(s) >= lower (1 - tol) on the accurate interval.
    inv = inverse_root_coefficients(lower * (1.0 - 10 * tol), root, tol=tol)
    probe = Design(power, lower, root, polar, inv, (0.0, 2.0), np.ones(1), 0.0)
    # Range of y over every s in [0, 1] (values below `lower` included, so
    # the power polynomial is never evaluated outside its fitted range).
    _, y = scalar_map(probe, np.r_[0.0, _grid(1e-12, 1.0, 4000)])
    y_range = (float(y.min()) * (1 - 1e-3), float(y.max()) * (1 + 1e-3))
    poly = _power_polynomial(root * (1.0 - power), *y_range, tol)
    d = Design(power, lower, root, polar, inv, y_range, poly, 0.0)
  s = _grid(lower, 1.0, 4000)
  out, _ = scalar_map(d, s)
  err = float(np.max(np.abs(out / s**power - 1.0)))
  return dataclasses.replace(d, error=err)


def lower_bound(eps: float, k: int) -> float:
  """Interval lower end for cutoff `eps` on a matrix with small side `k`.

  The input is normalized by the Gelfand bound `||(X X^T)^2||_F^(1/4)`,
  which lies in `[s_max, k^(1/8) s_max]`; a singular value `eps * s_max`
  can therefore land as low as `eps * k^(-1/8)`.
  """
  return float(eps) * float(k) ** (-1.0 / 8.0)


def paterson_stockmeyer_plan(degree: int) -> tuple[int, int]:
  """`(block, n_blocks)` for evaluating a degree-`degree` matrix polynomial.

  Powers `T^2..T^(block-1)` (and `T^block` if `n_blocks > 1`) are formed,
  then Horner's rule in `T^block` over `n_blocks` blocks: about
  `2 sqrt(degree)` products instead of `degree`.
  """
  block = max(1, math.ceil(math.sqrt(degree + 1)))
  return block, math.ceil((degree + 1) / block)


def matmul_count(d: Design) -> dict[str, int]:
  """Matrix products per stage (for FLOP counts in the benchmarks)."""
  polar = 3 * len(d.polar)  # Gram, A^2, B X (the first Gram/A^2 double
  # as the Gelfand bound).
  if d.power == 0.0:
    return {"polar": polar, "root": 0, "power": 0, "out": 0, "sym": 0}
  steps = len(d.inverse_root)
  # Per step P^2, log2(r) - 1 squarings for Q^(r/2), Q^(r/2) P Q^(r/2)
  # and Y Q; Y_1 = Q is free and the last step skips the P update.
  log_r = int(math.ceil(math.log2(d.root)))
  root = (3 + log_r) * steps - 1 - (1 + log_r)
  block, n_blocks = paterson_stockmeyer_plan(len(d.power_poly) - 1)
  power = max(0, block - 2) + (n_blocks > 1) + (n_blocks - 1)
  return {"polar": polar, "root": root, "power": power, "out": 2, "sym": 1}
