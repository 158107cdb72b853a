"""Searches the per-step quintics of `method="express"` (`minimax.EXPRESS_TABLES`).

Nonlinear least squares (scipy) over the `N` steps' coefficients, the
output weights solved inside for each design power (variable projection):
the residuals are the relative Frobenius errors of the scalar map
(`minimax.express_basis`) on `minimax.design_spectra`, for each power in
`minimax.EXPRESS_DESIGN_POWERS`. Starts: random gentle quintics (slope
2-7 at 0, value near 1 at 1) and random perturbations of the best so far.
Prints the best table; paste it into `htmuon_jax/_minimax.py`. A random,
time-limited search: a rerun finds a nearby table, not the same one.
`--polish` instead re-optimizes from the committed table once (it is a local
optimum: the coefficients and the error come back unchanged to the printed
digits), which checks a table against this objective.

    python scripts/design_express.py --steps 4 [--seconds 200] [--seed 0]
    python scripts/design_express.py --steps 4 --polish
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
from scipy import optimize

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from htmuon_jax import _minimax as minimax  # noqa: E402


def _table(theta: np.ndarray) -> tuple[tuple[float, float, float], ...]:
  return tuple(tuple(float(v) for v in row) for row in theta.reshape(-1, 3))


def residuals(theta: np.ndarray) -> np.ndarray:
  spectra = minimax.design_spectra()
  with np.errstate(all="ignore"):
    xs = [minimax.express_basis(s, _table(theta)) for s in spectra]
  if not all(np.all(np.isfinite(x)) and np.abs(x).max() < 100 for x in xs):
    # Diverging or huge intermediate values: rejected.
    return np.ones(sum(map(len, spectra)) * len(minimax.EXPRESS_DESIGN_POWERS))
  out = []
  for p in minimax.EXPRESS_DESIGN_POWERS:
    out += minimax.spectra_residuals(xs, [s**p for s in spectra])[1]
  return np.concatenate(out)


def _random_start(rng: np.random.Generator, steps: int) -> np.ndarray:
  g = np.exp(rng.uniform(np.log(2.0), np.log(7.0), steps))
  b = -rng.uniform(1.0, 3.0, steps) * g
  c = 1.0 - g - b + rng.normal(0.0, 0.3, steps)
  return np.stack([g, b, c], axis=1).ravel()


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--seconds", type=float, default=200.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
    "--polish", action="store_true", help="one run from the committed table"
  )
  args = ap.parse_args()
  n_terms = len(minimax.design_spectra()) * len(minimax.EXPRESS_DESIGN_POWERS)
  if args.polish:
    start = np.ravel(minimax.EXPRESS_TABLES[args.steps])
    before = float(np.sqrt(np.sum(residuals(start) ** 2) / n_terms))
    r = optimize.least_squares(residuals, start)
    print(f"committed: rms error {before:.4f}")
    print(f"polished:  rms error {np.sqrt(2 * r.cost / n_terms):.4f}")
    print(f"largest coefficient change {np.max(np.abs(r.x - start)):.2e}")
    return
  rng = np.random.default_rng(args.seed)
  best = None
  t0 = time.time()
  while time.time() - t0 < args.seconds:
    start = (
      _random_start(rng, args.steps)
      if best is None or rng.random() < 0.4
      else best[1] * np.exp(rng.normal(0.0, 0.2, best[1].shape))
    )
    r = optimize.least_squares(residuals, start, max_nfev=300)
    if best is None or r.cost < best[0]:
      best = (r.cost, r.x)
      # Root mean square over the (spectrum, power) pairs of their errors.
      print(f"rms error {np.sqrt(2 * r.cost / n_terms):.4f}", flush=True)
  assert best is not None
  print(f"  {args.steps}: (")
  for a, b, c in _table(best[1]):
    print(f"    ({a:.6f}, {b:.6f}, {c:.6f}),")
  print("  ),")


if __name__ == "__main__":
  main()
