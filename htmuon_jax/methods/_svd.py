"""`method="svd"`: `jnp.linalg.svd`, exact to round-off (see `spectral`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from htmuon_jax.methods._base import SpectralMethod
from htmuon_jax.methods._exact import exact_apply
from htmuon_jax._numerics import lapack_per_matrix


def svd_parts(x: jax.Array, eps: Any) -> tuple[jax.Array, ...]:
  """Thin SVD `(u, s, vh)` of `x`, one matrix per LAPACK call on CPU."""
  del eps
  return lapack_per_matrix(lambda m: jnp.linalg.svd(m, full_matrices=False), x)


@dataclasses.dataclass(frozen=True)
class SVD(SpectralMethod):
  """`jnp.linalg.svd` in fp32 (fp64 for fp64): exact to round-off; traced
  powers. Differentiable: `exact_power`'s JVP."""

  name = "svd"
  ordered = True

  def apply(self, x, state, power, eps, values):
    # One matrix per LAPACK call on CPU (`numerics.lapack_per_matrix`).
    return exact_apply(svd_parts, x, power, eps, values), state
