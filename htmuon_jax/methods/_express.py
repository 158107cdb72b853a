"""`method="express"`: `U diag(s**p) V^T` at the cost of Muon's Newton-Schulz.

With its default `steps=4` it runs 15 products of the same sizes as optax's
NS5 (`A = X X^T`, `A^2`, `(b A + c A^2) X` per step), so its dot FLOPs equal
NS5's; design and what was tried: docs/muon_cost_design.md. Scale by
`||G||_F`, then by the Gelfand bound `||A_0^2||_F^(1/4) >= s_max`; run `N`
per-step odd quintics (`minimax.EXPRESS_TABLES`); output
`sum_j w_j X_j + C X_N`, `C = sum_j b_j A_j + c_j A_j^2` (j = 0..N), with
the weights of `minimax.express_design`: `3 N + 3` products.

Accuracy: the budget buys a few percent, not 1e-5 (`method="polynomial"`
spends 1.9x as much for that): see `minimax.ExpressDesign.errors` and
BENCHMARKS.md ("Spectral power at Muon's cost"). Singular values far below
`s_max` (under ~1e-3) fade towards 0; `eps` does not move that point (it is
fixed by the step table), so it has no effect on this method.

Precision: `"accurate"` (every product in float32 at `HIGHEST`), `"fast"`
(bfloat16 operands, float32 accumulation: what tensor cores and the MXU
compute; iterates and sums stay float32) or `"auto"` (`"accurate"` on CPU,
`"fast"` on GPU/TPU).

`power` must be a concrete number (it selects the weights); under
`optax.inject_hyperparams` list it in `static_args`.

References:
  Amsel, Persson, Musco, Gower, `The Polar Express
  <https://arxiv.org/abs/2505.16932>`_, 2025 (per-step minimax quintics).
  Jordan, `Muon <https://github.com/KellerJordan/Muon>`_, 2024.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from htmuon_jax import _checks as checks
from htmuon_jax import _minimax as minimax
from htmuon_jax import _numerics as numerics
from htmuon_jax._checks import concrete_scalar
from htmuon_jax.methods._base import SpectralMethod
from htmuon_jax._numerics import conj_transpose as _t
from htmuon_jax._numerics import precision_mm as _mm


def check_steps(steps: Any) -> None:
  """ValueError unless `steps` has a table in `minimax.EXPRESS_TABLES`."""
  if isinstance(steps, bool) or steps not in minimax.EXPRESS_TABLES:
    raise ValueError(
      f'steps: method="express" has step tables for '
      f"{sorted(minimax.EXPRESS_TABLES)} (4: NS5's FLOPs, 5: 1.2x), got "
      f"{steps!r}."
    )


def spectral_power_express(
  x: jax.Array, power: Any, precision: str = "auto", steps: int = 4
) -> jax.Array:
  """`U diag(s**power) V^T` of float32 (or complex64) `(..., m, n)` `x` at
  NS5's FLOPs, as float32 (complex64). `power` in [0, 1] is concrete;
  `precision` and `steps` are `Express`'s. ValueError for a traced `power`,
  an unknown `precision` or `steps`."""
  p = concrete_scalar(power, "power")
  if p is None:
    raise ValueError(
      'power: method="express" needs a concrete power (it selects the '
      "output weights), got a traced value. Pass a Python number; under "
      "optax.inject_hyperparams list it in static_args, e.g. "
      "static_args=('power',)."
    )
  checks.check_precision(precision)
  check_steps(steps)
  d = minimax.express_design(p, minimax.EXPRESS_TABLES[steps])
  precision = checks.resolve_precision(precision)
  # 1. Scale: Frobenius (in `gram_start`), then the Gelfand bound: never
  # below s_max, so no normalized singular value exceeds 1 (the design's).
  x, wide, fro, a, a2 = numerics.gram_start(x, precision)
  top4 = jnp.sqrt(
    jnp.sum(jnp.square(jnp.abs(a2)), axis=(-2, -1), keepdims=True)
  )
  c2 = jnp.sqrt(top4)
  c2 = jnp.where(c2 > 0, c2, 1.0)
  x = x * jax.lax.rsqrt(c2)
  a, a2 = a / c2, a2 / jnp.square(c2)

  # 2.-3. N steps (unrolled, each its own coefficients), then A_N, A_N^2
  # and C X_N; the weighted sums (acc, C) cost no product.
  acc = float(d.w[0]) * x
  gram = float(d.b[0]) * a + float(d.c[0]) * a2
  for j, (ca, cb, cc) in enumerate(d.steps):
    if j > 0:
      a = _mm(x, _t(x), precision)
      a2 = _mm(a, a, precision)
      gram = gram + float(d.b[j]) * a + float(d.c[j]) * a2
    x = ca * x + _mm(cb * a + cc * a2, x, precision)
    acc = acc + float(d.w[j + 1]) * x
  a = _mm(x, _t(x), precision)
  a2 = _mm(a, a, precision)
  n = len(d.steps)
  gram = gram + float(d.b[n]) * a + float(d.c[n]) * a2
  acc = acc + _mm(gram, x, precision)
  # The input was divided by fro * ||A_0^2||_F^(1/4): the output scales by
  # its p-th power (log-space: fro may be tiny).
  out = acc * jnp.exp(p * (jnp.log(fro) + 0.25 * jnp.log(top4 + (top4 == 0))))
  return out if wide else _t(out)


@dataclasses.dataclass(frozen=True)
class Express(SpectralMethod):
  """`method="express"`: `spectral_power_express` (Muon's FLOP budget).

  Attributes:
    precision: `"auto"`, `"accurate"` or `"fast"` matrix products (see the
      module).
    steps: quintic steps before the final product: 4 (default: NS5's
      FLOPs) or 5 (1.2x NS5's FLOPs, more accurate).
  """

  name = "express"
  static_power = True

  precision: str = "auto"
  steps: int = 4

  def check_options(self) -> None:
    checks.check_precision(self.precision)
    check_steps(self.steps)

  def validate(self, power: Any, eps: Any, spectrum: str) -> None:
    super().validate(power, eps, spectrum)
    self.check_options()

  def prepare(self, power: Any, eps: Any) -> None:
    """Fits the output weights for a concrete `power` (cached)."""
    del eps  # Fixed by the step table: no effect on this method.
    self.check_options()
    p = concrete_scalar(power, "power")
    if p is not None:
      minimax.express_design(p, minimax.EXPRESS_TABLES[self.steps])

  def apply(self, x, state, power, eps, values):
    del eps, values  # s**p only; eps has no effect (see the module).
    out = spectral_power_express(x, power, self.precision, self.steps)
    return out, state
