"""The HTMuon authors' accelerated "NS" variant, as a benchmark baseline only.

From `../shared/README.md` section 2: Muon's quintic Newton-Schulz polar
factor (5 steps, Muon's coefficients) times `(G^T G)^(p/2)`, the latter by
repeated coupled Newton-Schulz square roots. It handles only `p = 2^-k`
(`(G^T G)^(p/2)` is `k + 1` square roots of `G^T G`) and is approximate by
construction: Muon's quintic leaves singular values in a band around 1, and
a fixed number of square-root iterations leaves small eigenvalues
unconverged. This is our re-implementation from that description (5 square-
root iterations per root, Frobenius normalization); it exists to show the
accuracy gap next to `method="polynomial"`, not to be used.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from htmuon_jax.methods._newton_schulz import newton_schulz

_HIGHEST = jax.lax.Precision.HIGHEST
SQRT_STEPS = 5


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def _ns_sqrt(a: jax.Array, steps: int = SQRT_STEPS) -> jax.Array:
  """Coupled Newton-Schulz square root of a PSD matrix (Higham 2008)."""
  norm = jnp.sqrt(jnp.sum(a * a, axis=(-2, -1), keepdims=True))
  norm = jnp.where(norm > 0, norm, 1.0)
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  y, z = a / norm, jnp.broadcast_to(eye, a.shape)
  for _ in range(steps):
    t = 0.5 * (3.0 * eye - _mm(z, y))
    y, z = _mm(y, t), _mm(t, z)
  return y * jnp.sqrt(norm)


def authors_ns(x: jax.Array, power: float) -> jax.Array:
  """`NS5(G) (G^T G)^(p/2)` for `p = 2^-k` (small side Gram matrix)."""
  k = -math.log2(power) if power > 0 else math.inf
  if power <= 0 or k != int(k):
    raise ValueError(f"power: the authors' NS handles only 2^-k, got {power}.")
  o = newton_schulz(x)
  wide = x.shape[-2] <= x.shape[-1]
  g = (
    _mm(x, jnp.swapaxes(x, -1, -2)) if wide else _mm(jnp.swapaxes(x, -1, -2), x)
  )
  for _ in range(int(k) + 1):  # (G G^T)^(2^-(k+1)) = (G G^T)^(p/2).
    g = _ns_sqrt(g)
  return _mm(g, o) if wide else _mm(o, g)


def matmul_count(power: float) -> int:
  """Products (counted as small-side-sized) per call, for FLOP estimates."""
  roots = int(-math.log2(power)) + 1
  return 15 + 1 + 3 * SQRT_STEPS * roots + 1
