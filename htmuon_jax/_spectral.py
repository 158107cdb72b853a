"""The spectral power `U diag(s**p) V^T` of a matrix, by several methods.

For `M = U diag(s) V^T` (thin SVD of the last two axes), HTMuon's update
direction is `U diag(s**p) V^T`: `p = 0` is Muon's orthogonalization `U V^T`,
`p = 1` returns `M`. Singular values are used raw, not normalized, so the
result scales like `M**p`.

Tiny singular values: one rule for every method. A singular value
`s <= eps * s_max` counts as zero and maps to 0 (also for `p = 0`, so a zero
or rank-deficient matrix never yields ones or NaNs). Without the rule, fp32
noise singular values of ~1e-7 would be raised to `(1e-7)**0.125 ~ 0.13`.
The methods approximate this rule to different accuracy:

* `"svd"`: `jnp.linalg.svd` in fp32; exact to fp32 round-off.
* `"eigh"`: eigendecomposition of the small-side Gram matrix in fp32. The
  Gram matrix squares the condition number, so small singular values are
  resolved poorly: exact to ~1e-6 for well-conditioned (e.g. rectangular
  Gaussian) matrices, ~1e-3 relative error on square Gaussian ones and ~1e-2
  when singular values span 1e3. Cheap on CPU; use it when the momentum is
  known to be well conditioned.
* `"newton_schulz"`: Muon's quintic iteration (`power == 0` only); see
  `htmuon_jax.methods._newton_schulz`. Approximate by design.
* `"polynomial"`: matrix products only (`htmuon_jax.methods._polynomial`): a
  weighted sum of the iterates of one fixed quintic, weights designed per
  (power, eps) by `htmuon_jax._minimax`. ~1e-5 relative error for
  spectra spanning up to 1e3; singular values below `max(eps, 1e-3) s_max`
  fade to 0 smoothly rather than being cut. `power` and `eps` must be
  static. `precision="fast"` runs its products with bfloat16 operands.
* `"express"`: matrix products only at the FLOPs of Muon's Newton-Schulz
  (`htmuon_jax.methods._express`): a few percent from the exact answer.
  `power` must be static.
* `"auto"`: `"svd"` on CPU (exact, traced powers allowed); accelerators use
  `"express"` (`"svd"` when `power` or `eps` is traced). Evidence in
  BENCHMARKS.md and `methods.Auto.resolve`.

All methods compute in float32 (bf16/fp16 inputs are upcast) and return the
input's dtype; float64 inputs (with `jax_enable_x64`) are computed in float64
by `"svd"` and `"eigh"` (`"polynomial"` and `"newton_schulz"` stay float32
accurate). Each matrix is first divided by a power of two (exact) so its
largest entry lies in [0.5, 1): inputs from 1e-30 to 1e38 give the same
relative accuracy; denormal inputs are flushed to zero by XLA on CPU and give
a zero result. Complex matrices (computed in complex64) work with every
method: `U diag(s**p) V^H` with the conjugate transpose.

Non-finite inputs: a matrix holding a NaN or an Inf never reaches LAPACK or
an iteration (LAPACK's SVD can loop forever on it); its result is all NaN,
for every method, so `optax.apply_if_finite` sees it. Other matrices of the
same batch are unaffected. A matrix with a zero-size axis gives an empty
(zero) result; integer inputs raise.

Methods are objects (`htmuon_jax.methods.SpectralMethod`): `methods.SVD`,
`methods.Eigh`, `methods.Auto`, `methods.NewtonSchulz`,
`methods.Polynomial`, `methods.Express` and `methods.Stream` (stateful:
transformations only).
The strings above are shortcuts for them; the registry
(`methods.register_method`, `methods.get_method`) maps names to objects.
This module holds `spectral_power` only.
"""

from __future__ import annotations

from typing import Any

import jax

from htmuon_jax import methods
from htmuon_jax._checks import check_eps
from htmuon_jax._checks import check_power

# `spectral_power`, and the names of `htmuon_jax.methods` this module's
# users have always found here.


def spectral_power(
  x: jax.Array,
  power: Any,
  *,
  method: methods.MethodLike = "auto",
  eps: Any = methods.DEFAULT_EPS,
  spectrum: str = "power",
) -> jax.Array:
  """Returns `U diag(s**power) V^T` for the last two axes of `x`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from htmuon_jax import spectral_power
    >>> x = jnp.diag(jnp.array([16.0, 1.0]))
    >>> print(jnp.diag(spectral_power(x, 0.25, method="svd")).round(4))
    [2. 1.]
    >>> spectral_power(jnp.ones((3, 4, 5)), 0.125).shape  # 3 matrices 4 x 5
    (3, 4, 5)

  Args:
    x: array of shape `(..., m, n)`; leading axes are a batch of matrices.
    power: exponent `p` in [0, 1]. May be a traced value for `"svd"` and
      `"eigh"` (changing it does not recompile); `"newton_schulz"` needs 0.
    method: `"auto"`, `"svd"`, `"eigh"`, `"newton_schulz"`, `"polynomial"`,
      `"express"`,
      a method registered with `methods.register_method`, or a method
      object carrying its own options (e.g.
      `htmuon_jax.methods.NewtonSchulz(steps=3)`,
      `htmuon_jax.methods.Polynomial(precision="fast")`; the optax-style
      flat keywords build one with `methods.from_keywords`). Stateful methods
      (`"stream"`) exist only in the transformations.
    eps: relative cutoff: singular values `s <= eps * s_max` count as zero.
    spectrum: `"power"` for `U diag(s**power) V^T`, or `"rank"` for the
      authors' rank-based `U diag(i**-power) V^T` (i-th largest singular
      value; ordered methods only: `"auto"` (meaning `"svd"`), `"svd"`,
      `"eigh"`).

  Returns:
    An array with the shape and dtype of `x`. For complex `x`, the result is
    `U diag(s**power) V^H` (computed in complex64).

  Raises:
    ValueError: for a `power` outside [0, 1], an unknown `method`, or
      `"newton_schulz"` with a non-zero power, or `spectrum="rank"` with a
      method that does not compute the singular values, a stateful
      method, or an `x` that is not floating point.
  """
  check_power(power)
  check_eps(eps)
  m = methods.check_method(method, power)
  m.validate(power, eps, spectrum)
  if x.ndim < 2:
    raise ValueError(
      f"x: spectral_power needs an array of rank >= 2, got shape {x.shape}."
    )
  # Non-finite matrices, zero-size and integer inputs: see `run_method`.
  return methods.run_method(m, x, None, power, eps, spectrum)[0]
