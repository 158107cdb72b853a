"""`method="polynomial"`: `U diag(s**p) V^T` with matrix products only.

SVD and eigh run as slow, poorly batched solver kernels on GPUs and TPUs,
while matrix products run at tensor-core speed. This method computes the
spectral power of an `m x n` matrix `G` (small side `k`) by products alone,
matched to `jnp.linalg.svd`'s answer under the package's cutoff rule:

1. Scale: `G / max|G|` (so tiny and huge inputs neither underflow nor
   overflow when squared), then by the Gelfand bound
   `c = ||(X X^T)^2||_F^(1/4)`, a *safe* upper bound on `s_max` (between
   `s_max` and `k^(1/8) s_max`; an underestimate would make the iteration
   diverge). Singular values now lie in (0, 1].
2. Polar stage: Polar Express quintics `X <- a X + (b A + c A^2) X`,
   `A = X X^T`, give `O ~ U V^T` (the first step reuses the bound's `A`,
   `A^2`). `power == 0` stops here.
3. `H = sym(O X^T) = U S U^T` on the small side (condition number
   `1/eps`, not the `1/eps^2` of the Gram matrix), then the coupled inverse
   8th root `Y ~ H^(-1/8)` (products of `k x k` matrices):
   `Q = q_t(P)`, `Y <- Y Q`, `P <- Q^4 P Q^4`.
4. `H^p = H w(Y)` with `w(y) ~ y^(8 (1 - p))` (a fitted polynomial, exact
   for `p = j/8`), output `c^p H^p O`: `O H^p`-type products never amplify
   the singular values below the cutoff the way `G H^(p - 1)` would.

All coefficients come from `htmuon_jax.minimax.design`, derived from
`power` and the interval `[eps k^(-1/8), 1]`: every singular value above the
cutoff `eps * s_max` lands inside it whatever the bound's overestimate, so
the package's rule holds. Singular values below the cutoff are not cut
sharply: they fade smoothly towards 0 (see the README's methods table).

`power` and `eps` must be concrete Python numbers (they select the
coefficients); under `optax.inject_hyperparams` list them in `static_args`.
Every product uses `precision=HIGHEST`, so TPUs (bf16 passes by default) and
GPUs (TF32) compute what CPUs do.

References:
  Amsel, Persson, Musco, Gower, `The Polar Express
  <https://arxiv.org/abs/2505.16932>`_, 2025.
  Guo, Higham, `A Schur-Newton Method for the Matrix p-th Root and its
  Inverse <https://doi.org/10.1137/050643374>`_, 2006.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from htmuon_jax import methods
from htmuon_jax import minimax
from htmuon_jax import numerics
from htmuon_jax.checks import concrete_scalar

__all__ = ["Polynomial", "spectral_power_polynomial", "interval_lower_bound"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _t(x: jax.Array) -> jax.Array:
  """Conjugate transpose (the transpose for real `x`)."""
  return jnp.swapaxes(x, -1, -2).conj()


def _sym(x: jax.Array) -> jax.Array:
  return 0.5 * (x + _t(x))


def _fro(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(jnp.abs(x)), axis=(-2, -1),
                         keepdims=True))


def interval_lower_bound(eps: float, k: int) -> float:
  """Lower end of the designed interval for cutoff `eps`, small side `k`.

  `k` is rounded up to a power of two (a lower bound that is still safe), so
  shapes share cached designs.
  """
  return minimax.lower_bound(eps, 2 ** math.ceil(math.log2(max(k, 1))))


def _matrix_polynomial(t: jax.Array, coeffs: np.ndarray) -> jax.Array:
  """`sum_i coeffs[i] t^i` by Paterson-Stockmeyer (~2 sqrt(deg) products)."""
  eye = jnp.eye(t.shape[-1], dtype=t.dtype)
  block, n_blocks = minimax.paterson_stockmeyer_plan(len(coeffs) - 1)
  powers = [eye, t]
  for _ in range(2, block):
    powers.append(_mm(powers[-1], t))
  coeffs = np.pad(coeffs, (0, block * n_blocks - len(coeffs)))

  def chunk(j: int) -> jax.Array:
    c = coeffs[j * block:(j + 1) * block]
    return sum(float(ci) * pi for ci, pi in zip(c, powers))

  out = chunk(n_blocks - 1)
  if n_blocks > 1:
    t_block = _mm(powers[-1], t)
    for j in range(n_blocks - 2, -1, -1):
      out = _mm(out, t_block) + chunk(j)
  return out


def _static(value: Any, name: str) -> float:
  v = concrete_scalar(value, name)
  if v is None:
    raise ValueError(
        f'{name}: method="polynomial" needs a concrete {name} (it selects '
        "the polynomial coefficients), got a traced value. Pass a Python "
        "number; under optax.inject_hyperparams list it in static_args, "
        f"e.g. static_args=({name!r},).")
  return v


def spectral_power_polynomial(x: jax.Array, power: Any,
                              eps: Any = methods.DEFAULT_EPS) -> jax.Array:
  """`U diag(s**power) V^T` of the last two axes of float32 `x`, by matmuls.

  Args:
    x: float32 (or complex64: every transpose is then the conjugate
      transpose) array `(..., m, n)`.
    power: exponent in [0, 1], a concrete number.
    eps: cutoff: singular values `s <= eps * s_max` count as zero; must be
      a concrete number in (0, 1).

  Returns:
    A float32 array of the shape of `x`.

  Raises:
    ValueError: for a traced `power` or `eps`, or `eps == 0`.
  """
  p = _static(power, "power")
  e = _static(eps, "eps")
  if not 0.0 < e < 1.0:
    raise ValueError(
        f'eps: method="polynomial" needs eps in (0, 1), got {eps!r}.')
  x = x.astype(numerics.compute_dtype(x.dtype))  # complex stays complex
  wide = x.shape[-2] <= x.shape[-1]
  if not wide:
    x = _t(x)  # Work on (k, l), k <= l: the small side is k x k.
  k = x.shape[-2]
  d = minimax.design(p, interval_lower_bound(e, k))
  eye = jnp.eye(k, dtype=jnp.float32)

  # 1. Scale by max|x| first: squaring 1e-30 or 1e30 would under/overflow.
  amax = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  amax = jnp.where(amax > 0, amax, 1.0)
  x = x / amax
  gram = _mm(x, _t(x))
  gram_norm = _fro(gram)
  gram_norm = jnp.where(gram_norm > 0, gram_norm, 1.0)
  gram_unit = gram / gram_norm
  gram_unit_sq = _mm(gram_unit, gram_unit)
  # c^2 = ||gram^2||_F^(1/2) >= s_max^2 (Gelfand), from the unit-norm Gram.
  c2 = jnp.sqrt(_fro(gram_unit_sq)) * gram_norm
  c2 = jnp.where(c2 > 0, c2, 1.0)
  x = x / jnp.sqrt(c2)
  a = gram / c2
  a_sq = gram_unit_sq * jnp.square(gram_norm / c2)

  # 2. Polar factor.
  o = x
  for i, (ca, cb, cc) in enumerate(d.polar):
    if i > 0:
      a = _mm(o, _t(o))
      a_sq = _mm(a, a)
    o = ca * o + _mm(cb * a + cc * a_sq, o)
  if p == 0.0:
    return o if wide else _t(o)

  # 3. H = U S U^T and the coupled inverse 8th root Y ~ H^(-1/8).
  h = _sym(_mm(o, _t(x)))
  pm, y = h, None
  steps = len(d.inverse_root)
  for i, (ca, cb, cc) in enumerate(d.inverse_root):
    q = ca * eye + cb * pm + cc * _mm(pm, pm)
    y = q if y is None else _mm(y, q)
    if i < steps - 1:
      # P <- Q^(r/2) P Q^(r/2), not Q^r P: Q's eigenvalues reach ~2.2 (so
      # Q^r ~ 600) in the directions where P is small, and a product's
      # rounding scales with the norms of its factors; the split form keeps
      # them ~25 and the small eigenvalues of P accurate in fp32 (20x
      # smaller error on a 512^2 Gaussian for p = 1/16).
      q_half = q
      for _ in range(int(math.log2(d.root)) - 1):
        q_half = _mm(q_half, q_half)
      pm = _sym(_mm(_mm(q_half, pm), q_half))

  # 4. H^p = H w(Y), w ~ y^(r (1 - p)) in z = (y - y_lo) / (y_hi - y_lo).
  y_lo, y_hi = d.y_range
  z = (y - y_lo * eye) / (y_hi - y_lo)
  h_p = _mm(h, _matrix_polynomial(z, d.power_poly))
  # The input was divided by amax * sqrt(c2): the output scales by its p-th
  # power (log-space: amax may be 1e-30).
  scale = jnp.exp(p * (jnp.log(amax) + 0.5 * jnp.log(c2)))
  out = scale * _mm(h_p, o)
  return out if wide else _t(out)


@dataclasses.dataclass(frozen=True)
class Polynomial(methods.SpectralMethod):
  """`method="polynomial"`: `spectral_power_polynomial` (matrix products)."""

  name = "polynomial"
  static_power = True

  def apply(self, x, state, power, eps, values):
    del values  # s**p only: the products never see singular values.
    return spectral_power_polynomial(x, power, eps), state
