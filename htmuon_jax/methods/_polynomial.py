"""`method="polynomial"`: `U diag(s**p) V^T` to ~1e-5 with matrix products only:
a weighted sum of a quintic's iterates (weights from `_minimax.design`, for a
concrete `power` and `eps`); design and precision modes: docs/methods.md."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from htmuon_jax import _checks as checks
from htmuon_jax import _minimax as minimax
from htmuon_jax import _numerics as numerics
from htmuon_jax._checks import concrete_scalar
from htmuon_jax.methods._base import DEFAULT_EPS
from htmuon_jax.methods._base import SpectralMethod
from htmuon_jax.methods._base import check_static
from htmuon_jax._numerics import conj_transpose as _t
from htmuon_jax._numerics import precision_mm as _mm


# Smallest designed interval end: spectra spanning up to 1e3 are accurate.
MIN_LOWER = 1e-3
_POWER_STEPS = 12


def design_interval(eps: float) -> float:
  """Lower end of the accurate interval (relative to `s_max`) for `eps`."""
  return max(float(eps), MIN_LOWER)


def prepare(
  power: Any, eps: Any = DEFAULT_EPS, precision: str = "auto"
) -> minimax.Design | None:
  """Validates the arguments and derives (caches) the design, when the
  optimizer is built (no LP in a jitted step); None if traced."""
  checks.check_precision(precision)
  p = concrete_scalar(power, "power")
  e = concrete_scalar(eps, "eps")
  if p is None or e is None:
    return None
  if not 0.0 < e < 1.0:
    raise ValueError(
      f'eps: method="polynomial" needs eps in (0, 1), got {eps!r}.'
    )
  return minimax.design(p, design_interval(e))


def _estimate_top(a2: jax.Array) -> jax.Array:
  """Power-iteration estimate of `lambda_max(a2)` (`<=` it), `(..., 1, 1)`."""
  k = a2.shape[-1]
  # A fixed pseudo-random start: no structured input is orthogonal to it.
  v = jnp.asarray(np.random.default_rng(0).standard_normal((k, 1)), jnp.float32)
  v = jnp.broadcast_to(v, a2.shape[:-1] + (1,))

  def step(_, v):
    v = numerics.mm(a2, v)
    n = jnp.sqrt(jnp.sum(jnp.square(jnp.abs(v)), axis=(-2, -1), keepdims=True))
    return v / jnp.where(n > 0, n, 1.0)

  v = jax.lax.fori_loop(0, _POWER_STEPS, step, v.astype(a2.dtype))
  v = numerics.mm(a2, v)
  return jnp.sqrt(jnp.sum(jnp.square(jnp.abs(v)), axis=(-2, -1), keepdims=True))


def spectral_power_polynomial(
  x: jax.Array, power: Any, eps: Any = DEFAULT_EPS, precision: str = "auto"
) -> jax.Array:
  """`U diag(s**power) V^T` of float32 (or complex64) `(..., m, n)` `x` by
  products, as float32. `power` and `eps` are concrete (they select the
  weights); singular values below `max(eps, MIN_LOWER) s_max` fade to 0.
  ValueError for a traced `power`/`eps`, `eps` outside (0, 1) or an unknown
  `precision`."""
  check_static("polynomial", power, eps)  # they select the coefficients
  p = float(power)
  d = prepare(p, eps, precision)
  precision = checks.resolve_precision(precision)
  assert d is not None  # power and eps are concrete (checked above).
  # 1. Scale: Frobenius first (in `gram_start`: s_max <= 1, no overflow in
  # A^2), then the power-iteration estimate of s_max from A_0^2.
  x, wide, fro, a, a2 = numerics.gram_start(x, precision)
  top4 = _estimate_top(a2)  # ~ s_max^4
  c2 = jnp.sqrt(top4)
  c2 = jnp.where(c2 > 0, c2, 1.0)
  x = x * jax.lax.rsqrt(c2)
  a, a2 = a / c2, a2 / jnp.square(c2)

  # 2.-3. Iterate F and sum the iterates with the designed weights; steps
  # after the first as corrections `X + D X` in `B = A - I` (bf16-safe on
  # converged directions; docs/methods.md, precision).
  qa, qb, qc = minimax.QUINTIC
  eye = jnp.eye(x.shape[-2], dtype=x.dtype)
  d0 = qa - 1.0 + qb + qc  # D at B = 0: 0 because F(1) = 1.
  d1, d2 = qb + 2.0 * qc, qc  # D = d0 I + d1 B + d2 B^2.
  # The first step in the plain form (keeps small singular values accurate).
  x_prev = x
  x = qa * x + _mm(qb * a + qc * a2, x, precision)
  acc = float(d.w[0]) * x_prev + float(d.w[1]) * x
  extra = float(d.b[0]) * a + float(d.c[0]) * a2
  # One loop body (weights indexed by the counter): one copy of the step.
  ws = jnp.asarray(d.w, x.real.dtype)
  bs = jnp.asarray(d.b, x.real.dtype)
  cs = jnp.asarray(d.c, x.real.dtype)

  def step(j, carry):
    x, acc, extra = carry
    b = _mm(x, _t(x), precision) - eye
    b2 = _mm(b, b, precision)
    a, a2 = eye + b, eye + 2.0 * b + b2
    x = x + _mm(d0 * eye + d1 * b + d2 * b2, x, precision)
    return x, acc + ws[j + 1] * x, extra + (bs[j] * a + cs[j] * a2)

  x, acc, extra = jax.lax.fori_loop(1, d.steps, step, (x, acc, extra))
  # `extra X_N` as `e X_N + (extra - e I) X_N`, `e` its value at A = I: the
  # product then rounds only the part that is not a multiple of I.
  e = float(np.sum(d.b) + np.sum(d.c))
  out = acc + e * x + _mm(extra - e * eye, x, precision)
  # The input was divided by fro * sqrt(c2): the output scales by its p-th
  # power (log-space: fro may be tiny).
  out = out * jnp.exp(p * (jnp.log(fro) + 0.25 * jnp.log(top4 + (top4 == 0))))
  return out if wide else _t(out)


@dataclasses.dataclass(frozen=True)
class Polynomial(SpectralMethod):
  """`method="polynomial"`: `spectral_power_polynomial` (matrix products).

  Attributes:
    precision: `"auto"`, `"accurate"` or `"fast"` matrix products (see
      `spectral_power_polynomial`).
  """

  name = "polynomial"
  static_power = True

  precision: str = "auto"

  def check_options(self) -> None:
    checks.check_precision(self.precision)

  def validate(self, power: Any, eps: Any, spectrum: str) -> None:
    super().validate(power, eps, spectrum)
    self.check_options()

  def prepare(self, power: Any, eps: Any) -> None:
    prepare(power, eps, self.precision)

  def apply(self, x, state, power, eps, values):
    del values  # s**p only: the products never see singular values.
    return spectral_power_polynomial(x, power, eps, self.precision), state
