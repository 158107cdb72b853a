"""`method="eigh"`: eigendecomposition of the small-side Gram matrix.

Cheaper than an SVD on CPU, but the Gram matrix squares the condition
number: see `htmuon_jax._spectral` for its accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from htmuon_jax.methods._base import SpectralMethod
from htmuon_jax.methods._base import keep_mask
from htmuon_jax.methods._exact import exact_apply
from htmuon_jax._numerics import conj_transpose as _ct
from htmuon_jax._numerics import lapack_per_matrix
from htmuon_jax._numerics import mm as _mm


def eigh_parts(x: jax.Array, eps: Any) -> tuple[jax.Array, ...]:
  """`(u, s, vh)` of `x` from the eigendecomposition of its small-side Gram
  matrix (rows of `vh` are 0 for the singular values under the cutoff)."""
  m, n = x.shape[-2:]
  wide = m <= n
  if not wide:
    x = _ct(x)
  # x is (k, l) with k <= l: the Gram matrix x x^H = U S^2 U^H is small.
  gram = _mm(x, _ct(x))
  gram = 0.5 * (gram + _ct(gram))
  _, u = lapack_per_matrix(jnp.linalg.eigh, gram)
  # Rows of B = U^T x are s_i v_i^T. Taking s_i as the row norms rather
  # than sqrt(eigenvalue) keeps fp32 noise directions at their true (tiny)
  # size: sqrt of a ~1e-7 * s_max**2 noise eigenvalue would be ~3e-4 *
  # s_max and survive the cutoff.
  b = _mm(_ct(u), x)
  s = jnp.linalg.norm(b, axis=-1)
  keep = keep_mask(s, eps)
  vh = b * jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)[..., None]
  if wide:
    return u, s, vh
  return _ct(vh), s, _ct(u)  # x^H = u s vh, so x = vh^H s u^H.


@dataclasses.dataclass(frozen=True)
class Eigh(SpectralMethod):
  """Eigendecomposition of the small-side Gram matrix in fp32 (see module).
  Differentiable: `exact_power`'s JVP."""

  name = "eigh"
  ordered = True

  def apply(self, x, state, power, eps, values):
    return exact_apply(eigh_parts, x, power, eps, values), state
