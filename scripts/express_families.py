"""Compares families of product-only iterations for `method="express"`.

A family is a string of steps and a final mode. Steps: `C` (cubic: `A =
X X^T`, `(b A) X`: 2 products), `Q` (quintic: `A`, `A^2`, `(b A + c A^2)
X`: 3), `S` (septic: `A`, `A^2`, `A^3 = A^2 A`, `(b A + c A^2 + d A^3) X`:
4) or `R` (sparse nonic: `A`, `A^2`, `A^4 = (A^2)^2`, `(b A + c A^2 + d
A^4) X`: 4). Final modes: `A3` (compute `A_N`, `A_N^2`, `A_N^3`, then one
product `C X_N`), `A2` (`A_N`, `A_N^2`, `C X_N`), `A` (`A_N`, `C X_N`), `N` (no
new Gram matrix, just `C X_N`) or `NN` (no new Gram matrix, `C X_N + C'
X_{N-1}`: two applications), where `C` is a weighted sum of every Gram
matrix (and power of one) computed on the way. The output is
`sum_j w_j X_j + C X_N`. Scaling (fourth argument): `gelfand` (default:
`||A_0^2||_F^(1/4) = (sum s^8)^(1/8)`, needs `A_0^2`), `gram`
(`||A_0||_F^(1/2) = (sum s^4)^(1/4)`, from `A_0` alone: frees `A_0^2` when
the first step is cubic) or `gelfand16` (`||A_0^4||_F^(1/8) = (sum
s^16)^(1/16)`, tighter, needs `A_0^4 = (A_0^2)^2`, one product more).
`--cross` adds one `k x k` product reusing the last two Gram matrices
computed (`A_N A_{N-1}`, or `A_{N-1} A_{N-2}` without `A_N`) to `C`.

The script prints the family's products split into those that touch the
`k x n` factor (`2 k^2 n` FLOPs each: the Gram matrices `A_j` and the
applications) and the `k x k` ones (`2 k^3`: powers of `A_j`), its dot
FLOPs over optax NS5's (`20 k^2 n + 10 k^3`) on square and `k x 4k`
matrices, then searches the steps' coefficients: nonlinear least squares,
the output weights solved inside for each power (variable projection),
random restarts and perturbations of the best for `seconds`
(`--method restarts`), or differential evolution over bounded step
coefficients (`--method de`, polished by least squares). The objective is
over the relative Frobenius errors of the scalar map, one per (design
spectrum, power) pair: their root mean square (`--objective rms`) or a
smooth maximum, their 8-norm (`--objective max`). `--spectra` restricts
the design spectra (`minimax.design_spectra`, by index: 0 `i^-0.8`, 1
`i^-1.1`, 2 `i^-1.5`, 3 geometric 1e2, 4 geometric 1e3, 5 Gaussian square,
6 Gaussian rectangular), e.g. to find the best any design of a family can
do on one spectrum (a bound on a design for all of them); `--powers`
restricts the powers (default `minimax.EXPRESS_DESIGN_POWERS`). Prints the
errors (percent, one row per power, one column per spectrum), their root
mean square and maximum, and the coefficients. A time-limited search:
reruns land close to, not exactly on, the same figures.

    python scripts/express_families.py QQQQ A2 200
    python scripts/express_families.py CQQQQ N 240 gram --seed 1
    python scripts/express_families.py QQQQ A2 150 --spectra 4 --method de
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

# The powers of A in a step (A^3 = A^2 A and A^4 = A^2 A^2 cost one each).
STEP_POWERS = {"C": (1,), "Q": (1, 2), "S": (1, 2, 3), "R": (1, 2, 4)}
FINAL_POWERS = {"A3": 3, "A2": 2, "A": 1, "N": 0, "NN": 0}
SCALE_POWERS = {"gelfand": (2,), "gram": (), "gelfand16": (2, 4)}
SCALE_EXPONENT = {"gelfand": 8, "gram": 4, "gelfand16": 16}
SPECTRUM_NAMES = (
  "i^-0.8",
  "i^-1.1",
  "i^-1.5",
  "geometric 1e2",
  "geometric 1e3",
  "Gaussian square",
  "Gaussian rect",
)


class Family:
  """Basis functions, product counts and coefficient layout of one family."""

  def __init__(
    self, spec: str, final: str, scale: str, spectra, powers, cross=False
  ):
    self.step_powers = [STEP_POWERS[t] for t in spec]
    self.degrees = [len(k) for k in self.step_powers]
    self.final = FINAL_POWERS[final]
    self.two = final == "NN"  # C X_N and C' X_{N-1}
    self.cross = cross
    self.powers = tuple(powers)
    # Powers of A_0 computed: the first step's, and the scaling's.
    self.powers0 = sorted(set(self.step_powers[0]) | set(SCALE_POWERS[scale]))
    n = len(self.degrees)
    # Products touching the k x n factor: A_0..A_{N-1}, the N
    # applications, A_N (unless final N) and C X_N.
    self.wide = 2 * n + 1 + (self.final > 0) + self.two
    # k x k products: every power of a Gram matrix beyond the first.
    self.small = (
      len(self.powers0)
      - 1
      + sum(d - 1 for d in self.degrees[1:])
      + max(self.final - 1, 0)
      + self.cross
    )
    q = SCALE_EXPONENT[scale]
    self.spectra = []
    for i in spectra:
      s = minimax.design_spectra()[i]  # Gelfand-normalized
      self.spectra.append(s / np.sum(s**q) ** (1 / q))

  def flops_ratio(self, n_over_k: float) -> float:
    """Dot FLOPs over NS5's on a `k x n` matrix (k <= n)."""
    r = n_over_k
    return (2 * r * self.wide + 2 * self.small) / (20 * r + 10)

  def steps(self, theta: np.ndarray) -> list[np.ndarray]:
    """Per step, its coefficients on `x` and `x A^k` (k in its powers)."""
    out, i = [], 0
    for d in self.degrees:
      out.append(theta[i : i + d + 1])
      i += d + 1
    return out

  def basis(self, theta: np.ndarray, s: np.ndarray) -> np.ndarray:
    xs = [s]
    for coeffs, powers in zip(self.steps(theta), self.step_powers):
      x = xs[-1]
      a = x * x
      xs.append(
        x * (coeffs[0] + sum(c * a**k for c, k in zip(coeffs[1:], powers)))
      )
    a = [x * x for x in xs]
    last = xs[-1]
    feats = list(xs)
    feats += [a[0] ** k * last for k in self.powers0]
    for j, powers in enumerate(self.step_powers[1:], 1):
      feats += [a[j] ** k * last for k in powers]
    feats += [a[-1] ** k * last for k in range(1, self.final + 1)]
    if self.cross:  # The last two Gram matrices computed, times X_N.
      j = len(a) - 1 if self.final > 0 else len(a) - 2
      feats.append(a[j] * a[j - 1] * last)
    if self.two:  # The same Gram matrices applied to X_{N-1} too.
      feats += [f / last * xs[-2] for f in feats[len(xs) :]]
    return np.array(feats)

  def bases(self, theta: np.ndarray) -> list[np.ndarray] | None:
    with np.errstate(all="ignore"):
      xs = [self.basis(theta, s) for s in self.spectra]
    if not all(np.all(np.isfinite(x)) and np.abs(x).max() < 100 for x in xs):
      return None  # Diverging or huge intermediate values: rejected.
    return xs

  def errors(self, theta: np.ndarray) -> np.ndarray | None:
    """`(len(powers), len(spectra))` relative Frobenius errors."""
    xs = self.bases(theta)
    if xs is None:
      return None
    out = []
    for p in self.powers:
      res = minimax.spectra_residuals(xs, [s**p for s in self.spectra])[1]
      out.append([np.linalg.norm(r) for r in res])
    return np.array(out)

  def residuals(self, theta: np.ndarray, objective: str) -> np.ndarray:
    xs = self.bases(theta)
    if objective == "max":
      if xs is None:
        return np.full(len(self.spectra) * len(self.powers), 1e6)
      # 8-norm of the pair errors: sum of (e / 3%)^8, a smooth maximum.
      return (self.errors(theta).ravel() / 0.03) ** 4
    if xs is None:
      return np.ones(sum(map(len, self.spectra)) * len(self.powers))
    out = []
    for p in self.powers:
      out += minimax.spectra_residuals(xs, [s**p for s in self.spectra])[1]
    return np.concatenate(out)

  def random_start(self, rng: np.random.Generator) -> np.ndarray:
    theta = []
    for d in self.degrees:
      g = np.exp(rng.uniform(np.log(2), np.log(7)))
      if d == 1:
        theta += [g, -rng.uniform(0.5, 0.9) * g]
        continue
      b = -rng.uniform(1, 3) * g
      rest = list(rng.normal(0, 0.3, d - 2))
      theta += [g, b, 1 - g - b - sum(rest) + rng.normal(0, 0.3)] + rest
    return np.array(theta)

  # Differential evolution: per step (a, b, ..., value at 1) in a box.
  def de_bounds(self) -> list[tuple[float, float]]:
    out = []
    for d in self.degrees:
      out += [(1.0, 9.0)] + [(-45.0, 0.0)] * (d > 1)
      out += [(-20.0, 20.0)] * (d - 2) + [(0.3, 1.6)]
    return out

  def from_box(self, u: np.ndarray) -> np.ndarray:
    theta, i = [], 0
    for d in self.degrees:
      head, value = list(u[i : i + d]), u[i + d]
      theta += head + [value - sum(head)]
      i += d + 1
    return np.array(theta)


def search(fam: Family, args) -> np.ndarray:
  rng = np.random.default_rng(args.seed)
  t0 = time.time()
  if args.method == "de":

    def cost(u):
      return float(np.sum(fam.residuals(fam.from_box(u), args.objective) ** 2))

    r = optimize.differential_evolution(
      cost,
      fam.de_bounds(),
      seed=args.seed,
      popsize=25,
      maxiter=10**6,
      tol=1e-12,
      polish=False,
      init="sobol",
      mutation=(0.5, 1.0),
      recombination=0.9,
      callback=lambda *a, **k: time.time() - t0 > args.seconds,
    )
    print(f"de: {r.nfev} evaluations, {time.time() - t0:.0f} s", flush=True)
    best = fam.from_box(r.x)
  else:
    # The smooth maximum is searched from the best root-mean-square design
    # (from random starts it is too steep): half the time for each.
    phases = [("rms", args.seconds)]
    if args.objective == "max":
      phases = [("rms", args.seconds / 2), ("max", args.seconds / 2)]
    best, n = None, 0
    for objective, seconds in phases:
      t1 = time.time()
      best_cost = np.inf
      if best is not None:
        r = optimize.least_squares(
          fam.residuals, best, args=(objective,), max_nfev=3000
        )
        best, best_cost = r.x, r.cost
      while time.time() - t1 < seconds:
        start = (
          fam.random_start(rng)
          if best is None or (objective == "rms" and rng.random() < 0.4)
          else best * np.exp(rng.normal(0, 0.2, len(best)))
        )
        r = optimize.least_squares(
          fam.residuals, start, args=(objective,), max_nfev=300
        )
        n += 1
        if r.cost < best_cost:
          best, best_cost = r.x, r.cost
    print(f"restarts: {n}, {time.time() - t0:.0f} s", flush=True)
  r = optimize.least_squares(
    fam.residuals, best, args=(args.objective,), max_nfev=3000
  )
  return r.x if fam.errors(r.x) is not None else best


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("spec", help="steps, e.g. QQQQ or CQQQQ")
  ap.add_argument("final", choices=sorted(FINAL_POWERS))
  ap.add_argument("seconds", type=float)
  ap.add_argument("scale", nargs="?", default="gelfand", choices=SCALE_POWERS)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
    "--cross",
    action="store_true",
    help="one k x k product more: the last two Gram matrices' product, in C",
  )
  ap.add_argument("--method", choices=("restarts", "de"), default="restarts")
  ap.add_argument("--objective", choices=("rms", "max"), default="rms")
  ap.add_argument(
    "--spectra", default="0,1,2,3,4,5,6", help="design spectra, by index"
  )
  ap.add_argument(
    "--powers",
    default=",".join(str(p) for p in minimax.EXPRESS_DESIGN_POWERS),
  )
  args = ap.parse_args()
  spectra = [int(i) for i in args.spectra.split(",")]
  powers = [float(p) for p in args.powers.split(",")]
  fam = Family(args.spec, args.final, args.scale, spectra, powers, args.cross)
  print(
    f"{args.spec} {args.final} {args.scale}: products {fam.wide} on the "
    f"k x n factor + {fam.small} k x k; x NS5 FLOPs: square "
    f"{fam.flops_ratio(1):.3f}, k x 4k {fam.flops_ratio(4):.3f}",
    flush=True,
  )
  theta = search(fam, args)
  e = fam.errors(theta)
  if e is None:
    print("no bounded design found")
    return
  print("spectra:", ", ".join(SPECTRUM_NAMES[i] for i in spectra))
  for p, row in zip(powers, e):
    print(f"p = {p:.4f}:", " ".join(f"{100 * v:5.2f}" for v in row))
  print(f"rms {np.sqrt(np.mean(e**2)):.4f} max {e.max():.4f}")
  print("steps", [np.round(c, 6).tolist() for c in fam.steps(theta)])


if __name__ == "__main__":
  main()
