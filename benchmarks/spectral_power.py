"""Speed and accuracy of the spectral-power methods on single matrices.

For each shape: median time after warm-up, relative Frobenius error against
a numpy float64 SVD (with the package's cutoff rule), matrix-product FLOPs,
achieved GFLOP/s, and the fraction of this machine's plain fp32 matmul
GFLOP/s (an `m x n` by `n x m` product timed at the same shape). Methods:
`svd`, `eigh`, `polynomial` and `express` (at `--power`), optax's Muon NS5 (`p = 0`, its
error is against the `p = 0` reference) and the authors' accelerated NS
variant (`benchmarks/authors_ns.py`). Inputs are Gaussian, the hardest case
for square shapes (s_min / s_max ~ 1 / (2 n)).

FLOPs: exact product counts for the matmul methods; for `svd` and `eigh`
textbook LAPACK estimates (thin R-SVD `6 m k^2 + 20 k^3`, symmetric
eigensolver with vectors `9 k^3`) plus their products, marked `~`.

Usage:
  python benchmarks/spectral_power.py [--quick] [--power 0.125] [--repeats 3]

Prints a markdown table and writes `benchmarks/results/spectral_power.json`
(and `.md`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402
import authors_ns  # noqa: E402

import htmuon_jax  # noqa: E402
from htmuon_jax.methods import _polynomial as polynomial  # noqa: E402

SHAPES = (
  (256, 256),
  (512, 512),
  (1024, 1024),
  (2048, 2048),
  (512, 1376),
  (1376, 512),
  (768, 2048),
  (16, 512, 512),
)
QUICK_SHAPES = ((2, 16, 24),)
METHODS = ("svd", "eigh", "polynomial", "express", "ns5", "authors_ns")


def reference(x: np.ndarray, power: float, eps: float = 1e-4) -> np.ndarray:
  u, s, vh = np.linalg.svd(x.astype(np.float64), full_matrices=False)
  keep = s > eps * s.max(axis=-1, keepdims=True)
  f = np.where(keep, np.where(keep, s, 1.0) ** power, 0.0)
  return (u * f[..., None, :]) @ vh


def rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def flops(method: str, shape, power: float) -> tuple[float, bool]:
  """(FLOPs, exact?) for one call on `shape` (leading axes are a batch)."""
  *batch, m, n = shape
  b = math.prod(batch)
  k, l = min(m, n), max(m, n)
  big, small = 2 * k * k * l, 2 * k**3  # One k x l x k product, one k^3.
  if method == "ns5":
    total = 5 * (2 * big + small)
  elif method == "authors_ns":
    roots = 3 * authors_ns.SQRT_STEPS * (int(-math.log2(power)) + 1)
    total = 5 * (2 * big + small) + 2 * big + roots * small
  elif method in ("polynomial", "polynomial_fast"):
    d = polynomial.prepare(power, 1e-4)
    # Per step X X^T, A^2, B X; then one (k x k) X_N product.
    total = d.steps * (2 * big + small) + big
  elif method in ("express", "express_fast"):
    # N steps of X X^T, A^2, B X, then A_N, A_N^2, C X_N: NS5's 15 at N = 4.
    total = (htmuon_jax.methods.Express().steps + 1) * (2 * big + small)
  elif method == "svd":
    total = (6 * l * k * k + 20 * k**3) + 2 * l * k * k
    return b * total, False
  elif method == "eigh":
    total = big + 9 * k**3 + small + big
    return b * total, False
  else:
    raise ValueError(method)
  return b * total, True


def make_fn(method: str, power: float):
  if method == "ns5":
    return jax.jit(htmuon_jax.methods._newton_schulz.newton_schulz)
  if method == "authors_ns":
    return jax.jit(functools.partial(authors_ns.authors_ns, power=power))
  if method in ("polynomial_fast", "express_fast"):
    # `precision` is a method option (spectral_power has no such keyword).
    fast = dataclasses.replace(
      htmuon_jax.methods.get_method(method.removesuffix("_fast")),
      precision="fast",
    )
    return jax.jit(
      functools.partial(htmuon_jax.spectral_power, power=power, method=fast)
    )
  return jax.jit(
    functools.partial(htmuon_jax.spectral_power, power=power, method=method)
  )


def matmul_gflops(shape, repeats: int) -> float:
  *batch, m, n = shape
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  f = jax.jit(lambda a: jnp.matmul(a, jnp.swapaxes(a, -1, -2)))
  t = _common.time_fn(f, x, repeats=repeats)
  return 2 * math.prod(batch) * m * m * n / t / 1e9


def noisy_gradient(shape, span: float) -> np.ndarray:
  """Gaussian singular vectors, singular values log-spaced over `span`."""
  rng = np.random.default_rng(0)
  *batch, m, n = shape
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((*batch, m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((*batch, n, k)))
  s = np.logspace(0.0, -np.log10(span), k)
  return ((u * s) @ np.swapaxes(v, -1, -2)).astype(np.float32)


def run(
  shapes, methods, power: float, repeats: int, span: float | None = None
) -> list[dict]:
  rows = []
  for shape in shapes:
    x_np = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if span:
      x_np = noisy_gradient(shape, span)
    x = jnp.asarray(x_np)
    peak = matmul_gflops(shape, repeats)
    refs = {}
    for method in methods:
      p = 0.0 if method == "ns5" else power
      if p not in refs:
        refs[p] = reference(x_np, p)
      fn = make_fn(method, p)
      t = _common.time_fn(fn, x, repeats=repeats)
      err = rel_err(fn(x), refs[p])
      fl, exact = flops(method, shape, p)
      rows.append(
        dict(
          shape="x".join(map(str, shape)),
          method=method,
          power=p,
          time_ms=1e3 * t,
          rel_err=err,
          gflop=fl / 1e9,
          flops_exact=exact,
          gflops=fl / t / 1e9,
          matmul_gflops=peak,
          roofline_fraction=fl / t / 1e9 / peak,
        )
      )
      print(
        f"{rows[-1]['shape']:>12} {method:>11}: {1e3 * t:9.1f} ms  "
        f"err {err:.1e}",
        flush=True,
      )
  return rows


def markdown(rows, power: float) -> str:
  lines = [
    f"p = {power} (NS5: p = 0). Time: median ms; error: relative Frobenius "
    "vs float64 SVD; GFLOP (`~`: LAPACK estimate); fraction of plain "
    "matmul GFLOP/s.",
    "",
    "| shape | method | ms | rel. error | GFLOP | GFLOP/s | of matmul |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    approx = "" if r["flops_exact"] else "~"
    lines.append(
      f"| {r['shape']} | {r['method']} | {r['time_ms']:.1f} | "
      f"{r['rel_err']:.1e} | {approx}{r['gflop']:.2f} | "
      f"{r['gflops']:.1f} | {r['roofline_fraction']:.2f} |"
    )
  by = {(r["shape"], r["method"]): r for r in rows}
  lines += [
    "",
    "| shape | polynomial / NS5 time | authors' NS error / "
    "polynomial error | fastest accurate (err <= 1e-3) |",
    "|---|---:|---:|---|",
  ]
  for shape in dict.fromkeys(r["shape"] for r in rows):
    poly, ns5 = by.get((shape, "polynomial")), by.get((shape, "ns5"))
    auth = by.get((shape, "authors_ns"))
    accurate = [
      r
      for r in rows
      if r["shape"] == shape
      and r["method"] not in ("ns5",)
      and r["rel_err"] <= 1e-3
    ]
    best = (
      min(accurate, key=lambda r: r["time_ms"])["method"] if accurate else "-"
    )
    ratio = f"{poly['time_ms'] / ns5['time_ms']:.2f}" if poly and ns5 else "-"
    gap = f"{auth['rel_err'] / poly['rel_err']:.0f}x" if poly and auth else "-"
    lines.append(f"| {shape} | {ratio} | {gap} | {best} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="two tiny shapes, one repeat: a smoke test",
  )
  parser.add_argument("--power", type=float, default=0.125)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--methods",
    default=",".join(METHODS),
    help="comma-separated; also polynomial_fast, express_fast "
    '(precision="fast")',
  )
  parser.add_argument(
    "--shapes",
    default=None,
    help="comma-separated subset, e.g. 1024x1024,512x1376",
  )
  parser.add_argument(
    "--span",
    type=float,
    default=None,
    help="log-spaced singular values spanning this ratio "
    "instead of Gaussian matrices (e.g. 1e6)",
  )
  parser.add_argument("--out", default=None, help="JSON path")
  args = parser.parse_args(argv)
  shapes = QUICK_SHAPES if args.quick else SHAPES
  if args.shapes:
    shapes = tuple(
      tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")
    )
  repeats = 1 if args.quick else args.repeats
  methods = args.methods.split(",")
  rows = run(shapes, methods, args.power, repeats, args.span)
  payload = dict(
    machine=_common.machine(),
    power=args.power,
    repeats=repeats,
    quick=args.quick,
    span=args.span,
    rows=rows,
  )
  _common.write(
    "spectral_power" + ("_quick" if args.quick else ""),
    payload,
    markdown(rows, args.power),
    args.out,
  )


if __name__ == "__main__":
  main()
