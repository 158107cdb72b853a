"""Compares families of product-only iterations for `method="express"`.

A family is a string of steps, `Q` (quintic: `A = X X^T`, `A^2`,
`(b A + c A^2) X`, 3 products) or `C` (cubic: `A`, `b A X`, 2 products),
and a final mode: `A2` (compute `A_N`, `A_N^2`, then one product `C X_N`),
`A` (`A_N`, then `C X_N`) or `N` (no new Gram matrix, just `C X_N`), where
`C` is a weighted sum of the Gram matrices computed on the way. The output
is `sum_j w_j X_j + C X_N`. For each family the steps' coefficients are
searched (least squares, the weights solved inside, random restarts for
`seconds`) on `minimax.design_spectra` (optional fourth argument `gram`:
rescaled as the input would be by `||A_0||_F^(1/2) = (sum s^4)^(1/4)`, the
bound a family without `A_0^2` can afford, in place of the Gelfand bound
`||A_0^2||_F^(1/4)`; `SEED` in the environment seeds the restarts) and
the powers
`minimax.EXPRESS_DESIGN_POWERS`; the script prints the product count and,
each time it improves, the root-mean-square (over spectrum and power) of
the relative Frobenius errors with the coefficients. A time-limited random
search: reruns land close to, not exactly on, the same figures.

    python scripts/express_families.py QQQQ A2 200
    SEED=1 python scripts/express_families.py CQQQQ N 240 gram
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import numpy as np
from scipy import optimize

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from htmuon_jax import _minimax as minimax  # noqa: E402

SPEC, FINAL, SECONDS = sys.argv[1], sys.argv[2], float(sys.argv[3])
SCALE = sys.argv[4] if len(sys.argv) > 4 else "gelfand"
# The design spectra are Gelfand-normalized ((sum s^8)^(1/8) = 1).
SPECTRA = tuple(
  s / np.sum(s**4) ** 0.25 if SCALE == "gram" else s
  for s in minimax.design_spectra()
)


def products() -> int:
  steps = 3 * SPEC.count("Q") + 2 * SPEC.count("C")
  return steps + {"A2": 2, "A": 1, "N": 0}[FINAL] + 1


def unpack(theta: np.ndarray) -> tuple:
  out, i = [], 0
  for t in SPEC:
    if t == "Q":
      out.append(tuple(theta[i : i + 3]))
      i += 3
    else:
      out.append((theta[i], theta[i + 1], 0.0))
      i += 2
  return tuple(out)


def basis(steps: tuple, s: np.ndarray) -> np.ndarray:
  xs = minimax.step_iterates(s, steps)
  a = xs * xs
  grams = a[:-1] if FINAL == "N" else a  # A_N only if computed
  squared = [j for j, t in enumerate(SPEC) if t == "Q"]
  squared += [len(SPEC)] if FINAL == "A2" else []
  return np.concatenate([xs, grams * xs[-1], a[squared] ** 2 * xs[-1]])


def residuals(theta: np.ndarray) -> np.ndarray:
  with np.errstate(all="ignore"):
    xs = [basis(unpack(theta), s) for s in SPECTRA]
  if not all(np.all(np.isfinite(x)) and np.abs(x).max() < 100 for x in xs):
    return np.ones(sum(map(len, SPECTRA)) * 3)
  out = []
  for p in minimax.EXPRESS_DESIGN_POWERS:
    out += minimax.spectra_residuals(xs, [s**p for s in SPECTRA])[1]
  return np.concatenate(out)


def random_start(rng: np.random.Generator) -> np.ndarray:
  theta = []
  for t in SPEC:
    g = np.exp(rng.uniform(np.log(2), np.log(7)))
    if t == "Q":
      b = -rng.uniform(1, 3) * g
      theta += [g, b, 1 - g - b + rng.normal(0, 0.3)]
    else:
      theta += [g, -rng.uniform(0.5, 0.9) * g]
  return np.array(theta)


def main() -> None:
  print("products", products(), flush=True)
  rng = np.random.default_rng(int(os.environ.get("SEED", "0")))
  n_terms = len(SPECTRA) * len(minimax.EXPRESS_DESIGN_POWERS)
  best = None
  t0 = time.time()
  while time.time() - t0 < SECONDS:
    start = (
      random_start(rng)
      if best is None or rng.random() < 0.4
      else best[1] * np.exp(rng.normal(0, 0.2, len(best[1])))
    )
    r = optimize.least_squares(residuals, start, max_nfev=300)
    if best is None or r.cost < best[0]:
      best = (r.cost, r.x)
      rms = np.sqrt(2 * r.cost / n_terms)
      print("rms", rms, repr(r.x.round(6).tolist()), flush=True)


if __name__ == "__main__":
  main()
