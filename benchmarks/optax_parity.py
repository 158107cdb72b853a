"""How far `htmuon_jax.muon(lr)` is from `optax.contrib.muon(lr)`.

For each matrix shape, gradient scale and dtype, three updates of both
optimizers on the same gradients (a matrix and a bias): whether the matrix
updates are bitwise equal, their largest relative Frobenius difference, and
whether the bias (AdamW) updates are bitwise equal. Gradients are standard
normal times the scale; `2^-10` is an exact power of two.

Usage: python benchmarks/optax_parity.py [--quick] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import htmuon_jax  # noqa: E402
from _common import machine, write  # noqa: E402  pylint: disable=import-error

SHAPES = [(4, 3), (16, 16), (32, 8), (8, 64)]
SCALES = [1e-3, 2.0**-10, 1.0, 1e3]
DTYPES = ["float32", "bfloat16"]
STEPS = 3


def _updates(opt, params, grads):
  state = opt.init(params)
  step = jax.jit(opt.update)
  outs = []
  for g in grads:
    u, state = step(g, state, params)
    outs.append(jax.tree.map(lambda x: np.asarray(x, np.float64), u))
  return outs


def compare(shape, scale, dtype, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.zeros(shape, dtype), "b": jnp.zeros(shape[1], dtype)}
  grads = [
    {
      k: jnp.asarray(scale * rng.standard_normal(p.shape), dtype)
      for k, p in params.items()
    }
    for _ in range(STEPS)
  ]
  ours = _updates(htmuon_jax.muon(0.02), params, grads)
  theirs = _updates(optax.contrib.muon(0.02), params, grads)
  rel = [
    float(np.linalg.norm(a["w"] - b["w"]) / np.linalg.norm(b["w"]))
    for a, b in zip(ours, theirs)
  ]
  return {
    "shape": list(shape),
    "scale": scale,
    "dtype": dtype,
    "matrix_bitwise_steps": sum(
      bool(np.array_equal(a["w"], b["w"])) for a, b in zip(ours, theirs)
    ),
    "matrix_max_rel_diff": max(rel),
    "adamw_bitwise": all(
      np.array_equal(a["b"], b["b"]) for a, b in zip(ours, theirs)
    ),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  shapes, scales, dtypes = SHAPES, SCALES, DTYPES
  if args.quick:
    shapes, scales, dtypes = SHAPES[:1], [1e-3, 1.0], DTYPES[:1]
  rows = [compare(s, c, d) for s in shapes for c in scales for d in dtypes]
  lines = [
    f"muon(0.02) vs optax.contrib.muon(0.02), {STEPS} updates each",
    "",
    "| shape | scale | dtype | bitwise matrix updates | max rel diff"
    " | AdamW leaf bitwise |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {tuple(r['shape'])} | {r['scale']:.3g} | {r['dtype']} | "
      f"{r['matrix_bitwise_steps']}/{STEPS} | "
      f"{r['matrix_max_rel_diff']:.1e} | {r['adamw_bitwise']} |"
    )
  write(
    "optax_parity",
    {"machine": machine(), "rows": rows},
    "\n".join(lines),
    args.out,
  )


if __name__ == "__main__":
  main()
