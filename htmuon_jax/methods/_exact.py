"""The exact methods, `method="svd"` and `method="eigh"`: `parts(x, eps) ->
(u, s, vh)`, turned into `U S^p V^H` by `exact_power` (finite JVP)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from htmuon_jax.methods._base import SpectralMethod
from htmuon_jax.methods._base import ValuesFn
from htmuon_jax.methods._base import keep_mask
from htmuon_jax.methods._base import powered_singular_values
from htmuon_jax._numerics import compute_dtype
from htmuon_jax._numerics import conj_transpose as _ct
from htmuon_jax._numerics import lapack_per_matrix
from htmuon_jax._numerics import mm as _mm


# parts(x, eps) -> (u, s, vh): a thin decomposition of `(..., m, n)` matrices.
Parts = Callable[[jax.Array, Any], tuple[jax.Array, ...]]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def exact_power(
  parts: Parts, x: jax.Array, power: jax.Array, eps: jax.Array
) -> jax.Array:
  """`U diag(s**power) V^T` (cutoff applied) of `(..., m, n)` `x` from
  `parts(x, eps)`, with a JVP finite at repeated and zero singular values."""
  u, s, vh = parts(x, eps)
  f = powered_singular_values(s, power, eps)
  return _mm(u * f[..., None, :].astype(u.dtype), vh)


@exact_power.defjvp
def _exact_power_jvp(parts, primals, tangents):
  # Daleckii-Krein, rectangular form, on the kept directions only (see
  # docs/methods.md, "Gradients of the exact methods"); `eps` gets none.
  x, power, eps = primals
  x_dot, power_dot, _ = tangents
  u, s, vh = parts(x, eps)
  keep = keep_mask(s, eps)
  f = powered_singular_values(s, power, eps)
  out = _mm(u * f[..., None, :].astype(u.dtype), vh)
  # Only the kept directions: U U^H and V V^H project onto them.
  u = u * keep[..., None, :].astype(u.dtype)
  vh = vh * keep[..., :, None].astype(vh.dtype)
  v = _ct(vh)
  s_safe = jnp.where(keep, s, 1.0)
  f_over_s = jnp.where(keep, f / s_safe, 0.0)
  si, sj = s[..., :, None], s[..., None, :]
  fi, fj = f[..., :, None], f[..., None, :]
  both = keep[..., :, None] & keep[..., None, :]
  diff = si - sj
  tie = jnp.abs(diff) <= jnp.finfo(s.dtype).eps ** (1 / 3) * jnp.maximum(si, sj)
  mid = jnp.where(both, 0.5 * (si + sj), 1.0)
  a = jnp.where(
    tie,
    jnp.where(both, power * mid ** (power - 1), 0.0),
    (fi - fj) / jnp.where(tie, 1.0, diff),
  )
  total = si + sj
  b = jnp.where(total > 0, (fi + fj) / jnp.where(total > 0, total, 1.0), 0.0)
  dxv = _mm(x_dot, v)
  p = _mm(_ct(u), dxv)
  sym, skew = 0.5 * (p + _ct(p)), 0.5 * (p - _ct(p))
  inner = a.astype(p.dtype) * sym + b.astype(p.dtype) * skew
  fs = f_over_s.astype(p.dtype)
  uh_dx = _mm(_ct(u), x_dot)
  tangent = (
    _mm(_mm(u, inner), vh)
    + _mm((dxv - _mm(u, p)) * fs[..., None, :], vh)
    + _mm(u * fs[..., None, :], uh_dx - _mm(p, vh))
  )
  log_s = jnp.where(keep, f * jnp.log(s_safe), 0.0) * power_dot
  tangent = tangent + _mm(u * log_s[..., None, :].astype(u.dtype), vh)
  return out, tangent.astype(out.dtype)


def exact_apply(
  parts: Parts, x: jax.Array, power: Any, eps: Any, values: ValuesFn
) -> jax.Array:
  """A method's `apply` from `parts`: `exact_power` for `s**p` (its JVP),
  else `U diag(values(s)) V^H`."""
  x = x.astype(compute_dtype(x.dtype))
  if values is powered_singular_values:
    real = jnp.real(x).dtype
    return exact_power(
      parts, x, jnp.asarray(power, real), jnp.asarray(eps, real)
    )
  u, s, vh = parts(x, eps)
  return _mm(u * values(s, power, eps)[..., None, :], vh)


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
    return exact_apply(svd_parts, x, power, eps, values), state


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
  # Rows of B = U^T x are s_i v_i^T: s_i as row norms (not sqrt(eigenvalue),
  # ~3e-4 s_max for fp32 noise) keeps noise under the cutoff.
  b = _mm(_ct(u), x)
  s = jnp.linalg.norm(b, axis=-1)
  keep = keep_mask(s, eps)
  vh = b * jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)[..., None]
  if wide:
    return u, s, vh
  return _ct(vh), s, _ct(u)  # x^H = u s vh, so x = vh^H s u^H.


@dataclasses.dataclass(frozen=True)
class Eigh(SpectralMethod):
  """Eigendecomposition of the small-side Gram matrix in fp32: cheaper than
  an SVD on CPU, squares the condition number. `exact_power`'s JVP."""

  name = "eigh"
  ordered = True

  def apply(self, x, state, power, eps, values):
    return exact_apply(eigh_parts, x, power, eps, values), state
