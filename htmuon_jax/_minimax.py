"""Design of the coefficients behind `method="polynomial"` (docs/methods.md).

Everything here is numpy float64, run once per configuration (and cached):
a minimax fit by linear programming (scipy's HiGHS) on a dense grid; no
coefficient is typed in. A products-only result is an odd polynomial applied
to each singular value, so the design works on scalars `s` in (0, top]:
iterate the fixed quintic `F(x) = 2.5 x - 2.5 x^3 + x^5` (`F(1) = 1`,
`F'(1) = 0`; monotone on [0, 1], attracting every start below its repelling
fixed point `sqrt(3/2) ~ 1.22`) `N` times, `x_0 = s`, `x_{j+1} = F(x_j)`,
then output `sum_j w_j x_j + (sum_{j<N} b_j a_j + c_j a_j^2) x_N`,
`a_j = x_j^2`. The weights, the only part that depends on `p`, are the
minimax fit of the relative error against `s**p` on `[lower, top]`.

Why a fixed map works: for small `s` the iterates of a fixed map are shifted
copies of one curve on a log scale (Koenigs linearization), so a weighted
sum of them reproduces a power law with a small ripple; about 2.5 steps per
decade of the interval. Below `lower` every basis function is odd and ~linear
in `s`, so the map decays smoothly to 0.

References:
  Koenigs, `Recherches sur les intégrales de certaines équations
  fonctionnelles <http://www.numdam.org/item/ASENS_1884_3_1__S3_0/>`_, 1884.
  Amsel, Persson, Musco, Gower, `The Polar Express: Optimal Matrix Sign
  Methods and Their Application to the Muon Algorithm
  <https://arxiv.org/abs/2505.16932>`_, 2025 (minimax design of matrix
  polynomial iterations).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

# The fixed quintic F(x) = a x + b x^3 + c x^5 iterated by the method.
QUINTIC = (2.5, -2.5, 1.0)
# Largest normalized singular value the design covers. The input is scaled by
# a power-iteration estimate of s_max, never above it and low by at most a
# few percent (`polynomial`); F's repelling fixed point is sqrt(3/2) ~ 1.22.
DEFAULT_TOP = 1.1
# Scalar (design) relative error: below the 1e-4 matrix target, leaving room
# for fp32 rounding of the products.
DEFAULT_TOL = 4e-5
MAX_STEPS = 16
_GRID = 1500


def minimax_fit(
  basis: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
  """`(coeffs, err)` minimizing `err = max |weight * (basis @ coeffs - target)|`
  on a grid, by linear programming: `basis` `(n_points, n_coeffs)`, `weight`
  positive (`1 / target`: relative error; ones if omitted). ValueError if the
  linear program fails."""
  basis = np.asarray(basis, np.float64)
  target = np.asarray(target, np.float64)
  weight = np.ones_like(target) if weight is None else np.asarray(weight)
  # Solve in an orthonormal basis of the weighted columns: the iterates are
  # nearly collinear near s = 1, which leaves the raw LP ill-conditioned.
  q, r = np.linalg.qr(weight[:, None] * basis)
  keep = np.abs(np.diag(r)) > 1e-12 * np.abs(np.diag(r)).max()
  q, r = q[:, keep], r[keep][:, keep]
  ortho = q / weight[:, None]
  coeffs = np.zeros(ortho.shape[1])
  err = np.inf
  # Iterative refinement: the LP solver works to ~1e-7 of its variables'
  # scale, so each pass re-fits the remaining residual, in its own scale.
  for _ in range(4):
    delta = _lp_fit(ortho, target - ortho @ coeffs, weight)
    new = coeffs + delta
    new_err = float(np.max(np.abs(weight * (ortho @ new - target))))
    if new_err >= err:
      break
    coeffs, err = new, new_err
    if err > 1e-5 or err < 1e-13:  # The solver's precision is enough.
      break
  full = np.zeros(basis.shape[1])
  full[keep] = np.linalg.solve(r, coeffs)
  return full, float(np.max(np.abs(weight * (basis @ full - target))))


def _lp_fit(
  basis: np.ndarray, target: np.ndarray, weight: np.ndarray
) -> np.ndarray:
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
    method="highs",
  )
  if res.status != 0:
    raise ValueError(f"minimax_fit: linear program failed: {res.message}")
  return res.x[:k] * scale


def grid(lo: float, hi: float, n: int = _GRID) -> np.ndarray:
  """Geometric + linear grid: resolves both ends of a wide interval."""
  return np.unique(np.r_[np.geomspace(lo, hi, n), np.linspace(lo, hi, n // 3)])


def iterates(s: np.ndarray, steps: int) -> np.ndarray:
  """`(steps + 1, len(s))`: `x_0 = s`, `x_{j+1} = F(x_j)` in float64."""
  a, b, c = QUINTIC
  xs = [np.asarray(s, np.float64)]
  for _ in range(steps):
    x = xs[-1]
    xs.append(x * (a + b * x * x + c * x**4))
  return np.stack(xs)


def basis_functions(s: np.ndarray, steps: int) -> np.ndarray:
  """`(len(s), 3 steps + 1)`: `x_0..x_N`, `a_j x_N`, `a_j^2 x_N` (j < N)."""
  xs = iterates(s, steps)
  a = xs[:-1] ** 2
  return np.concatenate([xs, a * xs[-1], a * a * xs[-1]]).T


@dataclasses.dataclass(frozen=True)
class Design:
  """Weights of the polynomial method for one (power, lower).

  Attributes:
    power: the exponent `p`.
    lower: normalized singular values in `[lower, top]` map to `s**p` within
      `error` (relative).
    top: upper end of the designed interval.
    steps: number `N` of iterations of `QUINTIC`.
    w: `(N + 1,)` weights of `X_0..X_N`.
    b: `(N,)` weights of `A_j` in the final product `(sum b_j A_j + c_j A_j^2)
      X_N`.
    c: `(N,)` weights of `A_j^2` there.
    error: max relative error of the scalar map on `[lower, top]` (float64,
      measured on a grid twice as fine as the fit's).
  """

  power: float
  lower: float
  top: float
  steps: int
  w: np.ndarray
  b: np.ndarray
  c: np.ndarray
  error: float

  @property
  def matmuls(self) -> int:
    """Matrix products: 3 per step plus the final one."""
    return 3 * self.steps + 1


def scalar_map(d: Design, s: np.ndarray) -> np.ndarray:
  """The method's action on normalized singular values `s` (float64)."""
  xs = iterates(s, d.steps)
  a = xs[:-1] ** 2
  return d.w @ xs + (d.b @ a + d.c @ (a * a)) * xs[-1]


@functools.lru_cache(maxsize=256)
def design(
  power: float,
  lower: float,
  *,
  tol: float = DEFAULT_TOL,
  top: float = DEFAULT_TOP,
  points: int = _GRID,
) -> Design:
  """The fewest-step design (cached) for `s**power` on `[lower, top]`: tries
  `N = 1, 2, ...` and keeps the first whose minimax relative error on a
  `points` grid (checked on twice as many) is at most `tol`. ValueError for
  arguments out of range or if `MAX_STEPS` steps do not reach `tol`."""
  power, lower = float(power), float(lower)
  if not 0.0 <= power <= 1.0:
    raise ValueError(f"power must be in [0, 1], got {power}.")
  if not 0.0 < lower < 1.0:
    raise ValueError(f"lower must be in (0, 1), got {lower}.")
  if not 1.0 <= top < 1.2:
    raise ValueError(f"top must be in [1, 1.2), got {top}.")
  if not 0.0 < tol < 1.0:
    raise ValueError(f"tol must be in (0, 1), got {tol}.")
  s = grid(lower, top, points)
  fine = grid(lower, top, 2 * points)
  target = s**power
  # ~2.5 steps per decade: start a little below that, to find the fewest.
  first = max(1, int(2.0 * np.log10(top / lower)))
  best = None
  for steps in range(first, MAX_STEPS + 1):
    try:
      coeffs, _ = minimax_fit(basis_functions(s, steps), target, 1.0 / target)
    except ValueError:  # A degenerate LP at this size: try one step more.
      continue
    w, b, c = np.split(coeffs, [steps + 1, 2 * steps + 1])
    d = Design(power, lower, top, steps, w, b, c, 0.0)
    err = float(np.max(np.abs(scalar_map(d, fine) / fine**power - 1.0)))
    d = dataclasses.replace(d, error=err)
    if best is None or err < best.error:
      best = d
    if err <= tol:
      return d
    if best.steps + 3 <= steps:  # More steps stopped helping (LP accuracy).
      break
  raise ValueError(
    f"no design with <= {steps} steps reaches relative error {tol} on "
    f"[{lower}, {top}] for power {power} (best: {best and best.error})."
  )


# --- method="express": per-step quintics at Muon's cost ----------------------
#
# The method: methods/_express.py. The step tables were searched offline
# (scripts/design_express.py, random restarts: a rerun finds nearby tables;
# `--polish` returns these); docs/muon_cost_design.md has the design.
EXPRESS_TABLES: dict[int, tuple[tuple[float, float, float], ...]] = {
  4: (
    (5.085871, -18.279086, 13.074582),
    (5.766042, -12.923642, 7.665929),
    (4.369229, -4.838657, 1.427021),
    (5.337049, -4.063815, 0.941724),
  ),
  5: (
    (3.026738, -7.350733, 5.119893),
    (4.399987, -15.205493, 15.978382),
    (5.173004, -12.48058, 8.913046),
    (4.520912, -5.911061, 2.211243),
    (5.479365, -4.41578, 1.108314),
  ),
}
EXPRESS_STEPS = EXPRESS_TABLES[4]
EXPRESS_DESIGN_POWERS = (1 / 16, 1 / 8, 1 / 4)


def step_iterates(
  s: np.ndarray, steps: tuple[tuple[float, float, float], ...]
) -> np.ndarray:
  """`(len(steps) + 1, len(s))`: `x_0 = s`, `x_{j+1} = a_j x + b_j x^3 + c_j
  x^5` in float64."""
  xs = [np.asarray(s, np.float64)]
  for a, b, c in steps:
    x = xs[-1]
    x2 = x * x
    xs.append(x * (a + x2 * (b + c * x2)))
  return np.stack(xs)


def express_basis(
  s: np.ndarray, steps: tuple[tuple[float, float, float], ...]
) -> np.ndarray:
  """`(3 (N + 1), len(s))`: `x_j`, then `x_j^2 x_N`, then `x_j^4 x_N`."""
  xs = step_iterates(s, steps)
  a = xs * xs
  return np.concatenate([xs, a * xs[-1], a * a * xs[-1]])


def gelfand_normalized(s: np.ndarray) -> np.ndarray:
  """Singular values divided by `(sum s^8)^(1/8) = ||A^2||_F^(1/4)`."""
  s = np.asarray(s, np.float64)
  return s / np.sum(s**8) ** 0.125


@functools.lru_cache(maxsize=1)
def design_spectra() -> tuple[np.ndarray, ...]:
  """Gelfand-normalized sample spectra the weights are fitted on.

  Gradient-like spectra (fixed seed, float64): power laws `i^-0.8` and
  `i^-1.1` (512 values), `i^-1.5` (128), geometric spectra spanning 1e2 and
  1e3 (256), and the singular values of Gaussian matrices 512 x 512 and
  256 x 1024. The fit minimizes the sum over them of the squared relative
  Frobenius error, i.e. what a matrix with that spectrum sees.
  """
  rng = np.random.default_rng(0)
  i = np.arange(1, 513, dtype=np.float64)
  spectra = [
    i**-0.8,
    i**-1.1,
    i[:128] ** -1.5,
    np.logspace(0, -2, 256),
    np.logspace(0, -3, 256),
    np.linalg.svd(rng.standard_normal((512, 512)), compute_uv=False),
    np.linalg.svd(rng.standard_normal((256, 1024)), compute_uv=False),
  ]
  return tuple(gelfand_normalized(s) for s in spectra)


def spectra_residuals(
  xs: list[np.ndarray], targets: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
  """`(w, residuals)`: the weights minimizing the summed squared relative
  Frobenius errors of `w @ xs[i]` (basis values per spectrum) against
  `targets[i]` (`s**p`), and per spectrum `(w @ x - t) / ||t||`."""
  b = np.concatenate(
    [x.T / np.linalg.norm(t) for x, t in zip(xs, targets)], axis=0
  )
  y = np.concatenate([t / np.linalg.norm(t) for t in targets])
  w, *_ = np.linalg.lstsq(b, y, rcond=1e-12)
  res = [(w @ x - t) / np.linalg.norm(t) for x, t in zip(xs, targets)]
  return w, res


@dataclasses.dataclass(frozen=True)
class ExpressDesign:
  """Output weights of `method="express"` for one power.

  Attributes:
    power: the exponent `p`.
    steps: the per-step quintics `(a, b, c)` (`EXPRESS_STEPS`).
    w: `(N + 1,)` weights of the iterates `X_0..X_N`.
    b: `(N + 1,)` weights of `A_j` in `C`.
    c: `(N + 1,)` weights of `A_j^2` in `C`.
    errors: per design spectrum (`design_spectra`), the relative Frobenius
      error of the scalar map (float64).
  """

  power: float
  steps: tuple[tuple[float, float, float], ...]
  w: np.ndarray
  b: np.ndarray
  c: np.ndarray
  errors: tuple[float, ...]

  @property
  def matmuls(self) -> int:
    """Matrix-matrix products: 3 per step and 3 at the end (as NS5's 5)."""
    return 3 * len(self.steps) + 3


def express_map(d: ExpressDesign, s: np.ndarray) -> np.ndarray:
  """The action of `method="express"` on Gelfand-normalized values."""
  return np.r_[d.w, d.b, d.c] @ express_basis(s, d.steps)


@functools.lru_cache(maxsize=256)
def express_design(
  power: float, steps: tuple[tuple[float, float, float], ...] = EXPRESS_STEPS
) -> ExpressDesign:
  """The output weights of `method="express"` for `power` in [0, 1] (cached):
  one linear least-squares fit on `design_spectra`, run when a method is
  built, never in a traced step. ValueError for a power outside [0, 1]."""
  power = float(power)
  if not 0.0 <= power <= 1.0:
    raise ValueError(f"power must be in [0, 1], got {power}.")
  spectra = design_spectra()
  xs = [express_basis(s, steps) for s in spectra]
  coeffs, res = spectra_residuals(xs, [s**power for s in spectra])
  w, b, c = np.split(coeffs, 3)  # 3 (N + 1) weights: w, b, c
  errors = tuple(float(np.linalg.norm(r)) for r in res)
  return ExpressDesign(power, tuple(steps), w, b, c, errors)
