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
  `htmuon_jax.newton_schulz`. Approximate by design.
* `"polynomial"`: matrix products only (`htmuon_jax.polynomial`): a
  weighted sum of the iterates of one fixed quintic, weights designed per
  (power, eps) by `htmuon_jax.minimax` (28 products, 1.87x the FLOPs of
  Muon's 5-step Newton-Schulz on a square matrix). ~1e-5 relative error for
  spectra spanning up to 1e3; singular values below `max(eps, 1e-3) s_max`
  fade to 0 smoothly rather than being cut. `power` and `eps` must be
  static. `precision="fast"` runs its products with bfloat16 operands.
* `"auto"`: `"svd"` on CPU (exact, traced powers allowed); accelerators use
  `"polynomial"` (`"svd"` when `power` or `eps` is traced). Evidence in
  BENCHMARKS.md and `resolve_method`.

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

Methods are objects (`htmuon_jax.methods.SpectralMethod`): `SVD`, `Eigh`,
`Auto` here, `NewtonSchulz` (`htmuon_jax.newton_schulz`), `Polynomial`
(`htmuon_jax.polynomial`) and `Stream` (`htmuon_jax.streaming`, stateful:
transformations only). The strings above are shortcuts for them; the
registry (`register_method`, `get_method`) maps names to objects.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp

from htmuon_jax import methods as methods_lib
from htmuon_jax import newton_schulz as ns_lib
from htmuon_jax import polynomial
from htmuon_jax import streaming
from htmuon_jax.checks import PRECISIONS  # noqa: F401 (re-exported)
from htmuon_jax.checks import check_eps
from htmuon_jax.checks import check_power
from htmuon_jax.checks import check_precision
from htmuon_jax.checks import check_range  # noqa: F401 (re-exported)
from htmuon_jax.checks import concrete_scalar  # noqa: F401 (re-exported)
from htmuon_jax.methods import DEFAULT_EPS
from htmuon_jax.methods import SPECTRA  # noqa: F401 (re-exported)
from htmuon_jax.methods import SpectralMethod
from htmuon_jax.methods import keep_mask
from htmuon_jax.methods import powered_singular_values
from htmuon_jax.methods import rank_singular_values  # noqa: F401 (re-exported)
from htmuon_jax.numerics import HIGHEST
from htmuon_jax.numerics import compute_dtype
from htmuon_jax.numerics import conj_transpose as _ct
from htmuon_jax.numerics import finite_matrices  # noqa: F401 (re-exported)
from htmuon_jax.numerics import lapack_per_matrix
from htmuon_jax.numerics import restore_non_finite  # noqa: F401 (re-exported)

__all__ = [
  "DEFAULT_EPS",
  "Auto",
  "Eigh",
  "MethodLike",
  "SVD",
  "get_method",
  "method_names",
  "prepare_method",
  "register_method",
  "resolve_method",
  "spectral_power",
]

# fn(x: float32 (..., m, n), power, eps) -> float32 (..., m, n): the form
# `register_method(name, fn)` takes.
SpectralFn = Callable[[jax.Array, Any, Any], jax.Array]
# What `method=` accepts: a registered name or a method object.
MethodLike = Union[str, SpectralMethod]


def _svd_parts(x: jax.Array, eps: Any) -> tuple[jax.Array, ...]:
  """Thin SVD `(u, s, vh)` of `x`, one matrix per LAPACK call on CPU."""
  del eps
  return lapack_per_matrix(lambda m: jnp.linalg.svd(m, full_matrices=False), x)


def _eigh_parts(x: jax.Array, eps: Any) -> tuple[jax.Array, ...]:
  """`(u, s, vh)` of `x` from the eigendecomposition of its small-side Gram
  matrix (rows of `vh` are 0 for the singular values under the cutoff)."""
  m, n = x.shape[-2:]
  wide = m <= n
  if not wide:
    x = _ct(x)
  # x is (k, l) with k <= l: the Gram matrix x x^H = U S^2 U^H is small.
  gram = jnp.matmul(x, _ct(x), precision=HIGHEST)
  gram = 0.5 * (gram + _ct(gram))
  _, u = lapack_per_matrix(jnp.linalg.eigh, gram)
  # Rows of B = U^T x are s_i v_i^T. Taking s_i as the row norms rather
  # than sqrt(eigenvalue) keeps fp32 noise directions at their true (tiny)
  # size: sqrt of a ~1e-7 * s_max**2 noise eigenvalue would be ~3e-4 *
  # s_max and survive the cutoff.
  b = jnp.matmul(_ct(u), x, precision=HIGHEST)
  s = jnp.linalg.norm(b, axis=-1)
  keep = keep_mask(s, eps)
  vh = b * jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)[..., None]
  if wide:
    return u, s, vh
  return _ct(vh), s, _ct(u)  # x^H = u s vh, so x = vh^H s u^H.


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=HIGHEST)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def exact_power(
  parts: Callable[[jax.Array, Any], tuple[jax.Array, ...]],
  x: jax.Array,
  power: jax.Array,
  eps: jax.Array,
) -> jax.Array:
  """`U diag(s**power) V^T` (cutoff rule applied) from `parts(x, eps)`.

  The exact methods' spectral power with a custom JVP that stays finite at
  repeated and zero singular values. With `f(s) = s**p` on the kept values
  and `P = U^H dX V`, the derivative is (Daleckii-Krein, rectangular form)

      dF = U (A o sym(P) + B o skew(P)) V^H
           + (I - U U^H) dX V diag(f/s) V^H + U diag(f/s) U^H dX (I - V V^H)
           + dp U diag(f log s) V^H,

  `A_ij = (f_i - f_j) / (s_i - s_j)` (its limit `f'(s_i)` at ties, within
  a relative `eps_mach**(1/3)`, taken at the midpoint), `B_ij = (f_i + f_j)
  / (s_i + s_j)`. Singular values under the cutoff count as exactly zero
  (their `f` is 0 whatever they are): `U` and `V` keep only the kept
  directions, so the arbitrary vectors of a zero or repeated singular
  value never enter. `eps` gets no derivative (the cutoff is piecewise
  constant).

  Args:
    parts: `parts(x, eps) -> (u, s, vh)` (`_svd_parts`, `_eigh_parts`).
    x: `(..., m, n)` matrices in their compute dtype.
    power: the exponent (a scalar array).
    eps: the relative cutoff (a scalar array).

  Returns:
    `U diag(f(s)) V^H`, `x`'s shape and dtype.
  """
  u, s, vh = parts(x, eps)
  f = powered_singular_values(s, power, eps)
  return _mm(u * f[..., None, :].astype(u.dtype), vh)


@exact_power.defjvp
def _exact_power_jvp(parts, primals, tangents):
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


def _exact_apply(parts, x, power, eps, values):
  x = x.astype(compute_dtype(x.dtype))
  if values is powered_singular_values:
    real = jnp.real(x).dtype
    return exact_power(
      parts, x, jnp.asarray(power, real), jnp.asarray(eps, real)
    )
  u, s, vh = parts(x, eps)
  return jnp.matmul(
    u * values(s, power, eps)[..., None, :], vh, precision=HIGHEST
  )


@dataclasses.dataclass(frozen=True)
class SVD(SpectralMethod):
  """`jnp.linalg.svd` in fp32 (fp64 for fp64): exact to round-off; traced
  powers. Differentiable: `exact_power`'s JVP."""

  name = "svd"
  ordered = True

  def apply(self, x, state, power, eps, values):
    # One matrix per LAPACK call on CPU (`numerics.lapack_per_matrix`).
    return _exact_apply(_svd_parts, x, power, eps, values), state


@dataclasses.dataclass(frozen=True)
class Eigh(SpectralMethod):
  """Eigendecomposition of the small-side Gram matrix in fp32 (see module).
  Differentiable: `exact_power`'s JVP."""

  name = "eigh"
  ordered = True

  def apply(self, x, state, power, eps, values):
    return _exact_apply(_eigh_parts, x, power, eps, values), state


@dataclasses.dataclass(frozen=True)
class Auto(SpectralMethod):
  """Picks a method for the current default backend (see `resolve`)."""

  name = "auto"
  ordered = True  # spectrum="rank" resolves to "svd".
  keyword_options = {"precision": "precision"}

  precision: str = "auto"

  def validate(self, power: Any, eps: Any, spectrum: str) -> None:
    super().validate(power, eps, spectrum)
    check_precision(self.precision)

  def resolve(self, power: Any, eps: Any, spectrum: str) -> SpectralMethod:
    """CPU: `"svd"`; accelerators: `"polynomial"` unless it cannot run.

    CPU: the fastest accurate method, `"svd"`: exact (it implements the
    cutoff rule sharply) and works with a traced `power`. Re-measured
    against the weighted-iterate `"polynomial"` (BENCHMARKS.md, "Polynomial
    accuracy"; shared 2-core CPU, one repeat): at 1024^2 svd took 0.44 s
    (error 2.2e-6), polynomial accurate 1.0 s (5.1e-4: it is exact only for
    spectra spanning <= 1e3); `"eigh"` is faster but misses 1e-3 on square
    matrices. GPU/TPU: `"polynomial"` at this method's `precision`, whose
    default `"auto"` is `"fast"` there (SVD and eigh run as solver kernels
    on accelerators, published ~100-500 ms for a 1024^2 fp32 SVD; the
    polynomial's products are estimated from peak rates at ~1x / ~1.9x
    optax muon's Newton-Schulz time on an H100 / TPU v5p with `"fast"`,
    ~14x / ~11x with `"accurate"`; `"fast"` is within 2x of the bf16 floor
    and matched `"svd"` in training, BENCHMARKS.md "Method quality"),
    unless `power` or `eps` is traced (e.g. injected under jit), which it
    cannot take, or `spectrum="rank"`, which it cannot compute: then
    `"svd"`. Pass `precision="accurate"` for CPU-identical numbers.
    """
    fast = _REGISTRY.get("polynomial")
    if jax.default_backend() == "cpu" or fast is None or spectrum != "power":
      return _REGISTRY["svd"]
    if fast.static_power and any(
      isinstance(v, jax.core.Tracer) for v in (power, eps)
    ):
      return _REGISTRY["svd"]
    # The caller's precision (default "auto": "fast" on GPU/TPU), set as
    # any shortcut keyword is (a method without that option ignores it).
    return get_method("polynomial", precision=self.precision)

  def apply(self, x, state, power, eps, values):
    spectrum = "power" if values is powered_singular_values else "rank"
    return self.resolve(power, eps, spectrum).apply(
      x, state, power, eps, values
    )


# The registry: name -> method object. Built-ins are listed here, so a name
# exists without any module being imported for its side effect.
_REGISTRY: dict[str, SpectralMethod] = {
  m.name: m
  for m in (
    Auto(),
    SVD(),
    Eigh(),
    ns_lib.NewtonSchulz(),
    polynomial.Polynomial(),
    streaming.Stream(),
  )
}


def register_method(
  method: Union[SpectralMethod, str], fn: SpectralFn | None = None
) -> None:
  """Registers a spectral method, so that `method=method.name` selects it.

  Args:
    method: a `htmuon_jax.methods.SpectralMethod` instance (its options are
      the defaults of the shortcut). Deprecated form: a name, with `fn`.
    fn: deprecated form only: `fn(x_float32, power, eps)`, a stateless,
      unordered method (wrapped in a `methods.FunctionMethod`).

  Raises:
    ValueError: if `method` is neither form.
  """
  if isinstance(method, str):
    warnings.warn(
      "register_method(name, fn) is deprecated; pass a method object, e.g. "
      "register_method(htmuon_jax.methods.FunctionMethod(name, fn)).",
      DeprecationWarning,
      stacklevel=2,
    )
    method = methods_lib.FunctionMethod(name=method, fn=fn)
  if not isinstance(method, SpectralMethod) or not method.name:
    raise ValueError(
      f"method: expected a named htmuon_jax.methods.SpectralMethod, got "
      f"{method!r}."
    )
  _REGISTRY[method.name] = method


def method_names() -> tuple[str, ...]:
  """The registered method names, in registration order."""
  return tuple(_REGISTRY)


def get_method(method: MethodLike, **keywords: Any) -> SpectralMethod:
  """The method object for `method=` (a name or an object).

  Args:
    method: a registered name (`"auto"`, `"svd"`, `"eigh"`,
      `"newton_schulz"`, `"polynomial"`, `"stream"`, ...) or a
      `SpectralMethod`, returned as it is.
    **keywords: the legacy per-method keywords of the transformations
      (`ns_coeffs`, `ns_steps`, `ns_preconditioning`, `ns_eps`, `rank`,
      `stream_qr`, ...): each sets the option it names
      (`SpectralMethod.keyword_options`) of a method given by name; the
      others are ignored. A method object keeps its own options.

  Returns:
    A `SpectralMethod`.

  Raises:
    ValueError: for an unknown name.
  """
  if isinstance(method, SpectralMethod):
    return method
  if not isinstance(method, str) or method not in _REGISTRY:
    raise ValueError(
      f"method: unknown value {method!r}; expected one of "
      f"{method_names()} or a htmuon_jax.methods.SpectralMethod."
    )
  obj = _REGISTRY[method]
  options = {
    field: keywords[k]
    for k, field in obj.keyword_options.items()
    if k in keywords
  }
  return dataclasses.replace(obj, **options) if options else obj


def resolve_method(
  method: MethodLike, power: Any = None, eps: Any = None
) -> str:
  """The name of the method that runs for `method` (`"auto"` picks one).

  See `Auto.resolve` for the rule.
  """
  return get_method(method).resolve(power, eps, "power").name


def prepare_method(
  method: MethodLike, power: Any, eps: Any, precision: str = "auto"
) -> None:
  """Validates `precision` and runs `method`'s construction-time preparation.

  (`SpectralMethod.prepare`, e.g. the polynomial's coefficient design, so
  it never runs in a jitted step.) A method given by name gets `precision`
  as its option; a method object keeps its own.

  Raises:
    ValueError: for an unknown `precision`, or arguments the method cannot
      take.
  """
  check_precision(precision)
  m = get_method(method, precision=precision).resolve(power, eps, "power")
  m.prepare(power, eps)


def check_spectrum(spectrum: str, method: MethodLike) -> None:
  """Validates `spectrum` and that `method` can compute it."""
  SpectralMethod.validate(get_method(method), None, None, spectrum)


def check_method(method: MethodLike, power: Any) -> None:
  """Validates a method and its compatibility with `power`."""
  m = get_method(method)
  if m.stateful:
    raise ValueError(
      f"method={m.name!r} keeps its state across steps, so it exists only "
      "in the stateful transformations (scale_by_spectral_power, "
      "scale_by_htmuon and the aliases), not in spectral_power."
    )
  m.validate(power, DEFAULT_EPS, "power")


def spectral_power(
  x: jax.Array,
  power: Any,
  *,
  method: MethodLike = "auto",
  eps: Any = DEFAULT_EPS,
  spectrum: str = "power",
  ns_coeffs: ns_lib.NSCoeffs = ns_lib.DEFAULT_NS_COEFFS,
  ns_steps: int = 5,
  ns_preconditioning: ns_lib.Preconditioning = "frobenius",
  ns_eps: float = 1e-8,
  precision: str = "auto",
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
      a method registered with `register_method`, or a method object (e.g.
      `htmuon_jax.newton_schulz.NewtonSchulz(steps=3)`). Stateful methods
      (`"stream"`) exist only in the transformations.
    eps: relative cutoff: singular values `s <= eps * s_max` count as zero.
    spectrum: `"power"` for `U diag(s**power) V^T`, or `"rank"` for the
      authors' rank-based `U diag(i**-power) V^T` (i-th largest singular
      value; ordered methods only: `"auto"` (meaning `"svd"`), `"svd"`,
      `"eigh"`).
    ns_coeffs: Newton-Schulz coefficients (`"newton_schulz"` by name only).
    ns_steps: Newton-Schulz iterations (`"newton_schulz"` by name only).
    ns_preconditioning: Newton-Schulz input scaling (`"newton_schulz"` by
      name only).
    ns_eps: Newton-Schulz normalization guard (`"newton_schulz"` by name
      only).
    precision: matrix-product precision of `"polynomial"` and
      `"newton_schulz"` (by name, or with `"auto"`): `"accurate"` (float32;
      the polynomial at HIGHEST, Newton-Schulz at the backend's default as
      optax), `"fast"` (bfloat16 operands, float32 accumulation, as tensor
      cores and TPUs compute) or `"auto"` (default: the polynomial
      `"accurate"` on CPU and `"fast"` on GPU/TPU, Newton-Schulz as optax).
      Other methods ignore it. See `htmuon_jax.polynomial`.

  Returns:
    An array with the shape and dtype of `x`. For complex `x`, the result is
    `U diag(s**power) V^H` (computed in complex64).

  Raises:
    ValueError: for a `power` outside [0, 1], an unknown `method`, or
      `"newton_schulz"` with a non-zero power, or `spectrum="rank"` with a
      method that does not compute the singular values, a stateful
      method, an unknown `precision`, or an `x` that is not floating point.
  """
  check_power(power)
  check_eps(eps)
  check_precision(precision)
  m = get_method(
    method,
    ns_coeffs=ns_coeffs,
    ns_steps=ns_steps,
    ns_preconditioning=ns_preconditioning,
    ns_eps=ns_eps,
    precision=precision,
  )
  check_method(m, power)
  m.validate(power, eps, spectrum)
  if x.ndim < 2:
    raise ValueError(
      f"x: spectral_power needs an array of rank >= 2, got shape {x.shape}."
    )
  # Non-finite matrices, zero-size and integer inputs: see `run_method`.
  return methods_lib.run_method(m, x, None, power, eps, spectrum)[0]


def __getattr__(name: str) -> Any:
  # Views of the registry under their former constant names.
  if name == "METHODS":  # what spectral_power accepts
    return tuple(n for n, m in _REGISTRY.items() if not m.stateful)
  if name == "ORDERED_METHODS":
    return tuple(n for n, m in _REGISTRY.items() if m.ordered)
  if name == "STATEFUL_METHODS":
    return tuple(n for n, m in _REGISTRY.items() if m.stateful)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
