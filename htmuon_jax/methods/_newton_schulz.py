"""`method="newton_schulz"`: Muon's quintic iteration, as optax runs it.

Step for step optax 0.2.8's (coefficients, normalization, dtype), so
`htmuon(power=0, method="newton_schulz")` reproduces `optax.contrib.muon`.
It settles singular values in a band around 1 (~[0.7, 1.1]), not at 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from htmuon_jax import _numerics as numerics
from htmuon_jax._checks import check_precision
from htmuon_jax._checks import concrete_scalar
from htmuon_jax.methods._base import SpectralMethod
from htmuon_jax._numerics import conj_transpose as _ct


DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
DION_NS_COEFFS = (
  (4.0848, -6.8946, 2.9270),
  (3.9505, -6.3029, 2.6377),
  (3.7418, -5.5913, 2.3037),
  (2.8769, -3.1427, 1.2046),
  (2.8366, -3.0525, 1.2012),
)
NS_COEFFS_PRESETS = {"standard": DEFAULT_NS_COEFFS, "dion": DION_NS_COEFFS}
PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")

Preconditioning = Literal["frobenius", "spectral", "aol", "schatten"]
NSCoeffs = Union[str, Sequence[float], Sequence[Sequence[float]], jax.Array]


def check_ns_coefficients(ns_coeffs: NSCoeffs, ns_steps: Any) -> None:
  """ValueError for an unknown preset, a table not `(3,)` or `(n, 3)`, fewer
  rows than `ns_steps`, or a bad `ns_steps`. Reads shapes only: no device
  array at import, before `jax.distributed` may start."""
  if isinstance(ns_coeffs, str):
    if ns_coeffs not in NS_COEFFS_PRESETS:
      raise ValueError(
        f"ns_coeffs: unknown preset {ns_coeffs!r}; expected one of "
        f"{sorted(NS_COEFFS_PRESETS)} or a (3,) / (n, 3) array."
      )
    shape: tuple[int, ...] = np.asarray(NS_COEFFS_PRESETS[ns_coeffs]).shape
  elif isinstance(ns_coeffs, (jax.Array, np.ndarray)):
    shape = ns_coeffs.shape  # a traced or concrete array: its shape only
  else:
    shape = np.asarray(ns_coeffs).shape
  if len(shape) not in (1, 2) or shape[-1] != 3:
    raise ValueError(f"ns_coeffs must have shape (3,) or (n, 3), got {shape}.")
  steps = check_ns_steps(ns_steps)
  if len(shape) == 2 and steps is not None and shape[0] < steps:
    raise ValueError(
      f"ns_coeffs has {shape[0]} rows, fewer than ns_steps={steps}."
    )


def ns_coefficient_table(ns_coeffs: NSCoeffs, ns_steps: Any) -> jax.Array:
  """The quintic coefficients: a `(3,)` vector used at every step, or an
  `(n, 3)` table whose last `ns_steps` rows run."""
  check_ns_coefficients(ns_coeffs, ns_steps)
  if isinstance(ns_coeffs, str):
    return jnp.asarray(NS_COEFFS_PRESETS[ns_coeffs], dtype=jnp.float32)
  return jnp.asarray(ns_coeffs, dtype=jnp.float32)


def check_ns_steps(ns_steps: Any) -> Optional[int]:
  """`ns_steps` as an int (ValueError unless >= 1), or None if traced."""
  if isinstance(ns_steps, jax.core.Tracer):
    return None
  bad = ValueError(f"ns_steps must be a positive int, got {ns_steps!r}.")
  if isinstance(ns_steps, bool):
    raise bad
  v = np.asarray(ns_steps)
  if (
    v.ndim != 0
    or not np.issubdtype(v.dtype, np.number)
    or np.iscomplexobj(v)
    or v != int(v)
    or int(v) < 1
  ):
    raise bad
  return int(v)


def _mm(a: jax.Array, b: jax.Array, fast: bool) -> jax.Array:
  """`a @ b`; `fast`: bfloat16 operands, float32 accumulation (tensor cores)."""
  if not fast or jnp.iscomplexobj(a):  # bf16 has no complex type.
    return a @ b
  return numerics.fast_mm(a, b).astype(jnp.promote_types(a.dtype, jnp.float32))


def _quintic(
  x: jax.Array, a: jax.Array, coeffs: jax.Array, fast: bool = False
) -> jax.Array:
  # (c * a) @ a, as optax's `c * a @ a` parses: same rounding as optax.
  b = coeffs[1] * a + _mm(coeffs[2] * a, a, fast)
  return coeffs[0] * x + _mm(b, x, fast)


def _first_step(
  x: jax.Array,
  coeffs: jax.Array,
  preconditioning: str,
  eps: float,
  fast: bool = False,
) -> jax.Array:
  a = _mm(x, _ct(x), fast)
  if preconditioning == "aol":
    # "Almost orthogonal layer" row rescaling (Boissin et al. 2025).
    s = jax.lax.rsqrt(jnp.clip(jnp.abs(a).sum(axis=-1), min=eps))[:, None]
    x, a = x * s, a * s * s.T
  elif preconditioning == "schatten":
    # Schatten-4 normalization (Grishina et al. 2025).
    s = jax.lax.rsqrt(jnp.clip(jnp.linalg.norm(a, ord="fro"), min=eps))
    x, a = x * s, a * s**2
  return _quintic(x, a, coeffs, fast)


def _orthogonalize(
  x: jax.Array,
  table: jax.Array,
  ns_steps: Any,
  preconditioning: str,
  eps: float,
  fast: bool = False,
) -> jax.Array:
  transposed = x.shape[0] > x.shape[1]
  if transposed:
    x = x.T
  table = table.astype(x.dtype)
  # Row of the table for iteration i (of a (3,) vector: the vector itself).
  first = 0 if table.ndim == 1 else table.shape[0] - ns_steps
  at = lambda i: jax.lax.dynamic_index_in_dim(table, first + i, keepdims=False)
  row = (lambda i: table) if table.ndim == 1 else at
  dtype = x.dtype
  x = _first_step(x, row(0), preconditioning, eps, fast)
  # A `fori_loop` whose bound may be traced (an injected `ns_steps`). Not
  # unrolled (optax unrolls it): one copy of the step in the program, the
  # same products and numbers.
  step = lambda i, x: _quintic(x, _mm(x, _ct(x), fast), row(i), fast)
  x = jax.lax.fori_loop(1, ns_steps, step, x)
  x = x.astype(dtype)
  return x.T if transposed else x


def check_preconditioning(preconditioning: str) -> None:
  """ValueError unless `preconditioning` is one of `PRECONDITIONINGS`."""
  if preconditioning not in PRECONDITIONINGS:
    raise ValueError(
      f"preconditioning: unknown value {preconditioning!r}; expected one of "
      f"{PRECONDITIONINGS}."
    )


def newton_schulz(
  x: jax.Array,
  *,
  ns_coeffs: NSCoeffs = DEFAULT_NS_COEFFS,
  ns_steps: int = 5,
  preconditioning: Preconditioning = "frobenius",
  eps: float = 1e-8,
  precision: str = "auto",
) -> jax.Array:
  """Approximate `U V^T` of `(..., m, n)` matrices by Newton-Schulz.

  The options are `NewtonSchulz`'s. A traced `ns_steps` (injected) runs
  in a `lax.fori_loop` with a traced bound, as in optax. Complex `x` uses
  the conjugate transpose. Returns `x`'s shape and dtype.
  """
  check_preconditioning(preconditioning)
  check_precision(precision)
  table = ns_coefficient_table(ns_coeffs, ns_steps)
  if preconditioning == "spectral":
    # The spectral norm is an SVD, which can hang on a non-finite matrix: it
    # is iterated as zeros and comes back NaN. (Matrix products alone make
    # a non-finite input's result NaN by themselves.)
    x, finite = numerics.finite_matrices(x)
  x = _normalize(x, preconditioning, eps)
  # "auto" is optax's numbers on every backend (optax muon's cost is the
  # baseline; "fast" is opt-in here).
  fast = precision == "fast"
  fn = lambda m: _orthogonalize(m, table, ns_steps, preconditioning, eps, fast)
  for _ in range(x.ndim - 2):
    fn = jax.vmap(fn)
  out = fn(x)
  if preconditioning == "spectral":
    out = numerics.restore_non_finite(out, finite)
  return out


def _normalize(x: jax.Array, preconditioning: str, eps: float) -> jax.Array:
  """`x / (||x|| + eps)` per matrix for the norm preconditionings, in
  float32 at least: in float16 `eps` rounds to 0 and norms overflow."""
  if preconditioning not in ("frobenius", "spectral"):
    return x
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if preconditioning == "frobenius":
    norm = jnp.linalg.norm(x32, axis=(-2, -1), keepdims=True)
  else:
    norm = numerics.lapack_per_matrix(
      lambda m: jnp.linalg.norm(m, ord=2, axis=(-2, -1), keepdims=True), x32
    )
  return (x32 / (norm + eps)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class NewtonSchulz(SpectralMethod):
  """`method="newton_schulz"`: Muon's iteration for `U V^T` (power 0 only),
  in the input's dtype as `optax.contrib.muon`.

  Attributes:
    coeffs: `(a, b, c)` of the quintic `a X + b (X X^T) X + c (X X^T)^2 X`,
      an `(n, 3)` table of per-step coefficients, or a preset name
      (`"standard"`, `"dion"`).
    steps: number of iterations (the last `steps` rows of a table).
    preconditioning: how `x` is scaled first: `"frobenius"` (optax's),
      `"spectral"`, `"aol"` or `"schatten"`.
    eps: guard added to the normalizing denominator, as in optax.
    precision: `"auto"`/`"accurate"`: products in the input's dtype at the
      backend's default precision, exactly as optax; `"fast"`: bfloat16
      operands with float32 accumulation on every backend.
  """

  name = "newton_schulz"
  keyword_options = {
    "ns_coeffs": "coeffs",
    "ns_steps": "steps",
    "preconditioning": "preconditioning",
    "ns_eps": "eps",
  }
  # Matrix products only: a non-finite input makes its result NaN by itself,
  # and its inputs stay optax's exactly (see `methods.run_method`).
  sanitizes_non_finite = False

  coeffs: NSCoeffs = DEFAULT_NS_COEFFS
  steps: int = 5
  preconditioning: Preconditioning = "frobenius"
  eps: float = 1e-8
  precision: str = "auto"

  def check_options(self) -> None:
    check_preconditioning(self.preconditioning)
    check_precision(self.precision)
    check_ns_coefficients(self.coeffs, self.steps)

  def validate(self, power: Any, eps: Any, spectrum: str) -> None:
    super().validate(power, eps, spectrum)
    self.check_options()
    if concrete_scalar(power, "power") != 0.0:
      raise ValueError(
        'method="newton_schulz" computes only U V^T and needs power == 0 '
        f"(as a static number), got power={power!r}."
      )

  def apply(self, x, state, power, eps, values):
    del power, eps, values  # U V^T: scale-invariant, no cutoff.
    return newton_schulz(
      x,
      ns_coeffs=self.coeffs,
      ns_steps=self.steps,
      preconditioning=self.preconditioning,
      eps=self.eps,
      precision=self.precision,
    ), state
