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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from htmuon_jax import newton_schulz as ns_lib

DEFAULT_EPS = 1e-4
HIGHEST = jax.lax.Precision.HIGHEST

# name -> fn(x: float32 (..., m, n), power, eps) -> float32 (..., m, n).
SpectralFn = Callable[[jax.Array, Any, Any], jax.Array]
_EXACT_METHODS: dict[str, SpectralFn] = {}
METHODS = ("auto", "svd", "eigh", "newton_schulz")
# Matrix-product precision of the product-only methods ("polynomial",
# "newton_schulz"): "accurate" (float32, the polynomial at HIGHEST) or "fast"
# (bfloat16 operands, float32 accumulation). Other methods ignore it.
PRECISIONS = ("accurate", "fast")
# name -> fn(power, eps, precision): validates and precomputes (e.g. designs
# coefficients) when an optimizer is built; methods listed take `precision=`.
_PREPARE: dict[str, Callable[..., Any]] = {}


def register_method(name: str, fn: SpectralFn, *,
                    prepare: Callable[..., Any] | None = None) -> None:
  """Registers a spectral method under `name` (used by `method=name`).

  A method given `prepare` is called as `fn(x, power, eps, precision=...)`
  and `prepare(power, eps, precision)` runs when an optimizer is built.
  """
  global METHODS
  _EXACT_METHODS[name] = fn
  if prepare is not None:
    _PREPARE[name] = prepare
  if name not in METHODS:
    METHODS = METHODS + (name,)


def check_precision(precision: str) -> None:
  """Raises ValueError for an unknown `precision`."""
  if precision not in PRECISIONS:
    raise ValueError(
        f"precision: unknown value {precision!r}; expected one of "
        f"{PRECISIONS}.")


def prepare_method(method: str, power: Any, eps: Any,
                   precision: str = "accurate") -> None:
  """Validates `precision` and runs `method`'s construction-time preparation.

  Raises:
    ValueError: for an unknown `precision`, or arguments the method cannot
      take.
  """
  check_precision(precision)
  method = resolve_method(method, power, eps)
  if method in _PREPARE:
    _PREPARE[method](power, eps, precision)


def _keep(s: jax.Array, eps: Any) -> jax.Array:
  """Mask of singular values above the cutoff `eps * s_max`."""
  s_max = jnp.max(s, axis=-1, keepdims=True)
  return s > eps * s_max


def powered_singular_values(s: jax.Array, power: Any, eps: Any) -> jax.Array:
  """`s**power` with the package's tiny-singular-value rule applied."""
  keep = _keep(s, eps)
  return jnp.where(keep, jnp.where(keep, s, 1.0) ** power, 0.0)


def rank_singular_values(s: jax.Array, power: Any, eps: Any) -> jax.Array:
  """`i**-power` for the i-th largest kept singular value, 0 for the rest.

  The HTMuon authors' rank-based spectrum `U diag(i**-p) V^T` (i = 1, 2, ...):
  it ignores the singular values' sizes and keeps only their order. `s` may
  come in any order (eigh and the streaming iteration do not sort); ties are
  ranked by position. The tiny-singular-value rule applies as for `s**p`.
  """
  keep = _keep(s, eps)
  rank = jnp.argsort(jnp.argsort(-s, axis=-1), axis=-1) + 1
  return jnp.where(keep, rank.astype(s.dtype) ** -power, 0.0)


# spectrum -> fn(s, power, eps): the value that replaces each singular value.
SPECTRA = {"power": powered_singular_values, "rank": rank_singular_values}
# Methods that see each singular value, hence can rank them.
ORDERED_METHODS = ("auto", "svd", "eigh", "stream")


def check_spectrum(spectrum: str, method: str) -> None:
  """Validates `spectrum` and that `method` can compute it."""
  if spectrum not in SPECTRA:
    raise ValueError(
        f"spectrum: unknown value {spectrum!r}; expected one of "
        f"{tuple(SPECTRA)}."
    )
  if spectrum == "rank" and method not in ORDERED_METHODS:
    raise ValueError(
        f'spectrum="rank" needs the ordered singular values, which '
        f"method={method!r} does not compute; use one of {ORDERED_METHODS}."
    )


def lapack_per_matrix(fn: Callable[..., Any], *xs: jax.Array) -> Any:
  """`fn(*xs)` for a LAPACK-backed `fn`, one matrix per call on CPU.

  jaxlib's CPU kernels for batched SVD, QR, eigh, Cholesky and triangular
  solves split the batch over XLA's intra-op thread pool and block that
  thread until the pieces are done. Every pool thread can end up blocked so,
  the pieces never run, and the program hangs: with several CPU devices in
  one process (`--xla_force_host_platform_device_count`, the usual way to
  test sharding; a batch of two 256 x 256 QRs after an all-reduce or an
  all-to-all, `tests/lapack_batch_cases.py`) and also, now and then, on a
  single CPU device (a scanned model's stacked kernels under `jit`, seen as
  `ParallelBatchMap` threads waiting in a `BlockingCounter`; jax 0.10.2). A
  single matrix per call is never split, so on CPU every batch runs as a
  `lax.map`. Accelerators keep the batched call.

  Args:
    fn: a function of `(..., m, n)` arrays with the same leading batch axes.
    *xs: its arguments.

  Returns:
    `fn(*xs)`.
  """
  batch = xs[0].shape[:-2]
  if math.prod(batch) <= 1 or jax.default_backend() != "cpu":
    return fn(*xs)
  flat = tuple(x.reshape((-1,) + x.shape[len(batch):]) for x in xs)
  out = jax.lax.map(lambda args: fn(*args), flat)
  return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


def compute_dtype(dtype: Any) -> Any:
  """The dtype the methods compute in: complex64 for complex, float64 for
  float64 (with `jax_enable_x64`), else float32."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.complex64
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _ct(x: jax.Array) -> jax.Array:
  """Conjugate transpose of the last two axes (the transpose if real)."""
  return jnp.swapaxes(x, -1, -2).conj()


def finite_matrices(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Zeros in place of every matrix of `x` that holds a NaN or an Inf.

  LAPACK's SVD loops forever on some non-finite inputs (a 16 x 16 matrix
  with one Inf), and a non-finite matrix poisons every iteration. Every
  method therefore computes on the sanitized matrices, and
  `restore_non_finite` makes the result of each non-finite matrix NaN
  afterwards, so `optax.apply_if_finite` and users' checks still see it.

  Args:
    x: an array `(..., m, n)`.

  Returns:
    `(sanitized, finite)`: `x` with each non-finite matrix replaced by
    zeros, and a boolean `(..., 1, 1)` mask of the finite matrices.
  """
  finite = jnp.all(jnp.isfinite(x), axis=(-2, -1), keepdims=True)
  return jnp.where(finite, x, jnp.zeros((), x.dtype)), finite


def restore_non_finite(out: jax.Array, finite: jax.Array) -> jax.Array:
  """`out`, with NaN for every matrix that `finite_matrices` sanitized."""
  # inf - inf: a NaN is made only where a matrix was non-finite (a NaN
  # constant would trip `jax.debug_nans` on every call).
  inf = jnp.where(finite, 0.0, jnp.inf).astype(out.dtype)
  return jnp.where(finite, out, inf - inf)


def _spectral_power_svd(
    x: jax.Array, power: Any, eps: Any, values=powered_singular_values
) -> jax.Array:
  u, s, vh = lapack_per_matrix(
      lambda m: jnp.linalg.svd(m, full_matrices=False), x)
  f = values(s, power, eps)
  return jnp.matmul(u * f[..., None, :], vh, precision=HIGHEST)


def _spectral_power_eigh(
    x: jax.Array, power: Any, eps: Any, values=powered_singular_values
) -> jax.Array:
  m, n = x.shape[-2:]
  wide = m <= n
  if not wide:
    x = _ct(x)
  # x is (k, l) with k <= l: the Gram matrix x x^H = U S^2 U^H is small.
  gram = jnp.matmul(x, _ct(x), precision=HIGHEST)
  gram = 0.5 * (gram + _ct(gram))
  _, u = lapack_per_matrix(jnp.linalg.eigh, gram)
  # Rows of B = U^T x are s_i v_i^T. Taking s_i as the row norms rather than
  # sqrt(eigenvalue) keeps fp32 noise directions at their true (tiny) size:
  # sqrt of a ~1e-7 * s_max**2 noise eigenvalue would be ~3e-4 * s_max and
  # survive the cutoff.
  b = jnp.matmul(_ct(u), x, precision=HIGHEST)
  s = jnp.linalg.norm(b, axis=-1)
  keep = _keep(s, eps)
  # U f(S) V^T = U diag(f(s) / s) B for the kept singular values.
  scale = jnp.where(keep, values(s, power, eps) / jnp.where(keep, s, 1.0), 0.0)
  out = jnp.matmul(u * scale[..., None, :], b, precision=HIGHEST)
  return out if wide else _ct(out)


register_method("svd", _spectral_power_svd)
register_method("eigh", _spectral_power_eigh)


def resolve_method(method: str, power: Any = None, eps: Any = None) -> str:
  """Maps `"auto"` to a concrete method for the current default backend.

  CPU: the fastest accurate method, `"svd"`: exact (it implements the cutoff
  rule sharply) and works with a traced `power`. Re-measured against the
  weighted-iterate `"polynomial"` (BENCHMARKS.md, "Polynomial accuracy"; a
  heavily shared 2-core CPU, one repeat): at 1024^2 svd took 1.1 s (error
  2.2e-6), polynomial accurate 3.7 s (5.1e-4: it is exact only for spectra
  spanning <= 1e3); `"eigh"` is faster but misses 1e-3 on square matrices.
  GPU/TPU: `"polynomial"` (SVD and eigh run as solver kernels there,
  published ~100-500 ms for a 1024^2 fp32 SVD; the polynomial's products are
  estimated from peak rates at ~14x optax muon's Newton-Schulz time on an
  H100 and ~11x on a TPU v5p in the default `precision="accurate"`, ~1x and
  ~1.9x with `precision="fast"`, i.e. well under a millisecond at 1024^2),
  unless `power` or `eps` is traced (e.g. injected under jit), which it
  cannot take: then `"svd"`. `precision` is not chosen by `"auto"`: the
  default stays `"accurate"` (CPU-identical numbers everywhere); pass
  `precision="fast"` for Muon-like cost (training evidence in BENCHMARKS.md,
  "Method quality").
  """
  if method != "auto":
    return method
  if jax.default_backend() == "cpu" or "polynomial" not in _EXACT_METHODS:
    return "svd"
  traced = any(isinstance(v, jax.core.Tracer) for v in (power, eps))
  return "svd" if traced else "polynomial"


def concrete_scalar(value: Any, name: str) -> float | None:
  """`value` as a float, or None if it is traced (e.g. injected under jit).

  Raises:
    ValueError: if `value` is not a scalar.
  """
  if isinstance(value, jax.core.Tracer):
    if value.ndim != 0:
      raise ValueError(f"{name} must be a scalar, got shape {value.shape}.")
    return None
  v = np.asarray(value)
  if v.ndim != 0 or not np.issubdtype(v.dtype, np.number):
    raise ValueError(f"{name} must be a real scalar, got {value!r}.")
  return float(v)


def check_range(
    value: Any, name: str, low: float, high: float, *, high_open: bool = False
) -> None:
  """Raises ValueError if a concrete `value` is outside [low, high] / [low, high)."""
  v = concrete_scalar(value, name)
  if v is None:
    return
  ok = low <= v < high if high_open else low <= v <= high
  if not ok:
    bracket = ")" if high_open else "]"
    raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}.")


def check_power(power: Any, *, name: str = "power") -> None:
  check_range(power, name, 0.0, 1.0)


def check_eps(eps: Any, *, name: str = "eps") -> None:
  check_range(eps, name, 0.0, 1.0, high_open=True)


def check_method(method: str, power: Any) -> None:
  """Validates a method name and its compatibility with `power`."""
  if method == "stream":
    raise ValueError(
        'method="stream" keeps its basis across steps, so it exists only in '
        "the stateful transformations (scale_by_spectral_power, "
        "scale_by_htmuon and the aliases), not in spectral_power."
    )
  if method not in METHODS:
    raise ValueError(
        f"method: unknown value {method!r}; expected one of {METHODS}."
    )
  if method == "newton_schulz" and concrete_scalar(power, "power") != 0.0:
    raise ValueError(
        'method="newton_schulz" computes only U V^T and needs power == 0 '
        f"(as a static number), got power={power!r}."
    )


def spectral_power(
    x: jax.Array,
    power: Any,
    *,
    method: str = "auto",
    eps: Any = DEFAULT_EPS,
    spectrum: str = "power",
    ns_coeffs: ns_lib.NSCoeffs = ns_lib.DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    ns_preconditioning: ns_lib.Preconditioning = "frobenius",
    ns_eps: float = 1e-8,
    precision: str = "accurate",
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
    method: `"auto"`, `"svd"`, `"eigh"`, `"newton_schulz"`, or a method
      registered with `register_method` (e.g. `"polynomial"`).
    eps: relative cutoff: singular values `s <= eps * s_max` count as zero.
    spectrum: `"power"` for `U diag(s**power) V^T`, or `"rank"` for the
      authors' rank-based `U diag(i**-power) V^T` (i-th largest singular
      value; `"auto"`, `"svd"` and `"eigh"` only, `"auto"` meaning `"svd"`).
    ns_coeffs: Newton-Schulz coefficients (`"newton_schulz"` only).
    ns_steps: Newton-Schulz iterations (`"newton_schulz"` only).
    ns_preconditioning: Newton-Schulz input scaling (`"newton_schulz"` only).
    ns_eps: Newton-Schulz normalization guard (`"newton_schulz"` only).
    precision: matrix-product precision of `"polynomial"` and
      `"newton_schulz"`: `"accurate"` (float32; the polynomial at HIGHEST,
      Newton-Schulz at the backend's default as optax) or `"fast"` (bfloat16
      operands, float32 accumulation, as tensor cores and TPUs compute).
      Other methods ignore it. See `htmuon_jax.polynomial`.

  Returns:
    An array with the shape and dtype of `x`. For complex `x`, the result is
    `U diag(s**power) V^H` (computed in complex64).

  Raises:
    ValueError: for a `power` outside [0, 1], an unknown `method`, or
      `"newton_schulz"` with a non-zero power, or `spectrum="rank"` with a
      method that does not compute the singular values, or an `x` that is
      not floating point.
  """
  check_power(power)
  check_eps(eps)
  check_method(method, power)
  check_spectrum(spectrum, method)
  check_precision(precision)
  if x.ndim < 2:
    raise ValueError(
        f"x: spectral_power needs an array of rank >= 2, got shape {x.shape}."
    )
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    raise ValueError(
        f"x: spectral_power needs a floating-point array, got dtype "
        f"{x.dtype} (an integer matrix has no meaningful U S^p V^T; cast it "
        "first)."
    )
  if x.size == 0:
    return jnp.zeros_like(x)  # No singular values: the zero update.
  if concrete_scalar(power, "power") == 1.0 and spectrum == "power":
    return x  # U S V^T itself: momentum SGD, no work and no cutoff needed.
  # No non-finite matrix reaches LAPACK or an iteration (see
  # `finite_matrices`): its result is NaN.
  x_in = x
  finite = jnp.all(jnp.isfinite(x), axis=(-2, -1), keepdims=True)
  if resolve_method(method, power, eps) != "newton_schulz":
    # (Newton-Schulz has only matrix products: a non-finite input makes its
    # result NaN by itself, and its inputs stay optax's exactly.)
    x, finite = finite_matrices(x)
  compute = compute_dtype(x.dtype)
  # Scale each matrix by a power of two (exact in floating point) so its
  # largest entry lies in [0.5, 1): Gram matrices of 1e30 or 1e-30 inputs then
  # neither overflow nor underflow. U f(S) V^T scales back by 2^(e * power).
  scaled, exponent = _power_of_two_normalize(x)
  if spectrum == "rank":  # i**-p ignores the scale of s.
    fn = {"auto": _spectral_power_svd, "svd": _spectral_power_svd,
          "eigh": _spectral_power_eigh}[method]
    out = fn(scaled.astype(compute), power, eps,
             values=rank_singular_values)
    return restore_non_finite(out, finite).astype(x_in.dtype)
  method = resolve_method(method, power, eps)
  if method == "newton_schulz":  # scale-invariant; runs in x's dtype as optax
    out = ns_lib.newton_schulz(
        scaled, ns_coeffs=ns_coeffs, ns_steps=ns_steps,
        preconditioning=ns_preconditioning, eps=ns_eps, precision=precision)
    return restore_non_finite(out, finite)
  kwargs = {"precision": precision} if method in _PREPARE else {}
  out = _EXACT_METHODS[method](scaled.astype(compute), power, eps, **kwargs)
  out = out.astype(compute) * jnp.exp2(
      exponent.astype(jnp.real(out).dtype) * power)
  return restore_non_finite(out, finite).astype(x_in.dtype)


def _power_of_two_normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(x / 2^e, e)` per matrix, with `max|x| / 2^e` in [0.5, 1) (e = 0 for 0)."""
  max_abs = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  _, exponent = jnp.frexp(max_abs.astype(compute_dtype(max_abs.dtype)))
  exponent = jnp.where(jnp.isfinite(max_abs), exponent, 0)
  if jnp.iscomplexobj(x):  # ldexp takes real arrays: scale each part (exact).
    scaled = jax.lax.complex(jnp.ldexp(x.real, -exponent),
                             jnp.ldexp(x.imag, -exponent))
    return scaled.astype(x.dtype), exponent
  return jnp.ldexp(x, -exponent).astype(x.dtype), exponent
