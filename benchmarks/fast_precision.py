"""How close is `precision="fast"` to what bf16 allows? Error against the floor.

The fast setting of `method="polynomial"` runs every matrix product on
bfloat16 operands (float32 accumulation). Its target: a relative Frobenius
error (against a float64 SVD, the package's cutoff rule) of at most 2x the
*floor*, what rounding the input to bfloat16 alone does to the exact answer,
measured per matrix. This script measures both, for square, tall, wide and
batched Gaussians, a 10x span, log-spaced spectra over 1e3 and 1e6 and a
power law, at several powers; it prints a table and writes
`benchmarks/results/fast_precision.{json,md}`. Beside it: `method="express"`
(Muon's FLOPs, a few percent from the exact answer by design) in both
precisions.

    python benchmarks/fast_precision.py
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import _common  # noqa: E402

import htmuon_jax  # noqa: E402
from tests.reference import matrix_with_spectrum  # noqa: E402
from tests.reference import rel_err  # noqa: E402
from tests.reference import spectral_power_ref  # noqa: E402

POWERS = (0.0, 0.125, 0.25, 0.5)


def cases(quick: bool) -> dict[str, np.ndarray]:
  """Named float64 test matrices (fixed seed)."""
  rng = np.random.default_rng(0)
  out = {
    "gaussian 48x48": rng.standard_normal((48, 48)),
    "gaussian 128x384": rng.standard_normal((128, 384)),
    "gaussian 384x128": rng.standard_normal((384, 128)),
    "gaussian batch 3x24x40": rng.standard_normal((3, 24, 40)),
    "span 10, 256^2": matrix_with_spectrum(
      rng, 256, 256, np.logspace(0, -1, 256)
    ),
    "span 1e3, 128^2": matrix_with_spectrum(
      rng, 128, 128, np.logspace(0, -3, 128)
    ),
    "power law i^-1.5, 64x80": matrix_with_spectrum(
      rng, 64, 80, np.arange(1, 65) ** -1.5
    ),
  }
  if quick:
    return {k: out[k] for k in ("gaussian 48x48", "span 1e3, 128^2")}
  out["gaussian 512^2"] = rng.standard_normal((512, 512))
  out["span 1e6, 256^2"] = matrix_with_spectrum(
    rng, 256, 256, np.logspace(0, -6, 256)
  )
  return out


def bf16_floor(x: np.ndarray, power: float) -> float:
  """Relative error of the exact answer on the bf16-rounded input."""
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
  return rel_err(spectral_power_ref(xb, power), spectral_power_ref(x, power))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="2 matrices, 2 powers")
  ap.add_argument("--out", default=None, help="JSON path")
  args = ap.parse_args(argv)
  powers = (0.0, 0.125) if args.quick else POWERS
  rows = []
  for name, x in cases(args.quick).items():
    for p in powers:
      ref = spectral_power_ref(x, p)
      errs = {
        prec: rel_err(
          htmuon_jax.spectral_power(
            jnp.asarray(x, jnp.float32),
            p,
            method=htmuon_jax.methods.Polynomial(precision=prec),
          ),
          ref,
        )
        for prec in ("accurate", "fast")
      }
      # method="express" (NS5's FLOPs): its bf16 cost next to its own
      # float32 error, which is the design's few percent.
      express = {
        prec: rel_err(
          htmuon_jax.spectral_power(
            jnp.asarray(x, jnp.float32),
            p,
            method=htmuon_jax.methods.Express(precision=prec),
          ),
          ref,
        )
        for prec in ("accurate", "fast")
      }
      floor = bf16_floor(x, p)
      rows.append(
        dict(
          matrix=name,
          power=p,
          floor=floor,
          fast=errs["fast"],
          ratio=errs["fast"] / floor,
          accurate=errs["accurate"],
          express_fast=express["fast"],
          express_accurate=express["accurate"],
        )
      )
  lines = [
    '`method="polynomial"`, relative Frobenius error against a float64 '
    "SVD; floor: the exact answer on the input rounded to bf16. Target: "
    'fast <= 2x floor. Last two columns: `method="express"`.',
    "",
    "| matrix | p | bf16 floor | fast | fast / floor | accurate | "
    "express fast | express accurate |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['matrix']} | {r['power']:g} | {r['floor']:.2e} | "
      f"{r['fast']:.2e} | {r['ratio']:.2f} | {r['accurate']:.1e} | "
      f"{r['express_fast']:.3f} | {r['express_accurate']:.3f} |"
    )
  worst = max(r["ratio"] for r in rows)
  lines += ["", f"Largest fast / floor: {worst:.2f}."]
  payload = {"rows": rows, "max_ratio": worst, "machine": _common.machine()}
  _common.write("fast_precision", payload, "\n".join(lines), args.out)
  return payload


if __name__ == "__main__":
  main()
