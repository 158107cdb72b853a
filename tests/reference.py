"""Independent numpy float64 references shared by the tests.

Nothing here imports htmuon_jax: these are the rules written out from the
paper's text (the update rules in the project's README.md, "Optimizers"), so
the package is checked against them.
"""

from __future__ import annotations

import numpy as np


def spectral_power_ref(x, power: float, eps: float = 1e-4) -> np.ndarray:
  """`U diag(s**p) V^T` in float64; `s <= eps * s_max` counts as zero."""
  x = np.asarray(x, dtype=np.float64)
  u, s, vh = np.linalg.svd(x, full_matrices=False)
  s_max = s.max(axis=-1, keepdims=True)
  keep = s > eps * s_max
  f = np.where(keep, np.where(keep, s, 1.0) ** power, 0.0)
  return (u * f[..., None, :]) @ vh


def rel_err(a, b) -> float:
  """Relative Frobenius error of `a` against the reference `b`."""
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def matrix_with_spectrum(
  rng: np.random.Generator, m: int, n: int, s: np.ndarray
) -> np.ndarray:
  """An m x n matrix with singular values `s` and random singular vectors."""
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  return (u * np.asarray(s)[:k]) @ v.T


def nesterov_ref(m, g, beta: float, t: int) -> tuple[np.ndarray, np.ndarray]:
  """optax's bias-corrected Nesterov momentum at step `t` (1, 2, ...).

  Returns the new EMA `m` and the direction `N = beta m / (1 - beta^(t+1))
  + (1 - beta) g / (1 - beta^t)` (the aliases' rule; the HTMuon authors'
  drops both corrections).
  """
  m = beta * m + (1 - beta) * g
  n = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta**t)
  return m, n
