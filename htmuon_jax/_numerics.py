"""Numerical helpers of the methods: exact power-of-two rescaling, LAPACK one
matrix per call on CPU, and non-finite matrices kept from LAPACK (NaN out)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


HIGHEST = jax.lax.Precision.HIGHEST


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a @ b` at `precision=HIGHEST` (float32 products on every backend)."""
  return jnp.matmul(a, b, precision=HIGHEST)


def fast_mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a @ b` of bf16 operands into float32 (`precision="fast"`; real only)."""
  return jnp.matmul(
    a.astype(jnp.bfloat16),
    b.astype(jnp.bfloat16),
    preferred_element_type=jnp.float32,
  )


def precision_mm(a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
  """`fast_mm` for `"fast"` and real operands (no complex bf16), else `mm`."""
  if precision == "fast" and not jnp.iscomplexobj(a):
    return fast_mm(a, b)
  return mm(a, b)


class GramStart(NamedTuple):
  """The start of a matrix-product method (see `gram_start`)."""

  x: jax.Array  # wide (k <= l), divided by `fro`
  wide: bool  # whether the input was wide (else `x` is its transpose)
  fro: jax.Array  # the Frobenius norm per matrix (1 for a zero matrix)
  a: jax.Array  # x x^H (k x k)
  a2: jax.Array  # a a


def gram_start(x: jax.Array, precision: str) -> GramStart:
  """The product methods' start: `x` wide (small Gram matrices), divided by
  its Frobenius norm (no overflow in `A^2`), and `A = X X^H`, `A^2`."""
  x = x.astype(compute_dtype(x.dtype))  # complex stays complex
  if precision == "fast" and jax.default_backend() == "cpu":
    # XLA's CPU runtime rejects a bf16 x bf16 -> f32 dot whose operand is a
    # transpose reshaped to add a batch axis (an embedding read vocab -> d,
    # alone in its group: "Unsupported element type for DotThunk"); the
    # barrier makes the operand a plain array first.
    x = jax.lax.optimization_barrier(x)
  wide = x.shape[-2] <= x.shape[-1]
  if not wide:
    x = conj_transpose(x)
  fro = jnp.sqrt(jnp.sum(jnp.square(jnp.abs(x)), axis=(-2, -1), keepdims=True))
  fro = jnp.where(fro > 0, fro, 1.0)
  x = x / fro
  a = precision_mm(x, conj_transpose(x), precision)
  return GramStart(x, wide, fro, a, precision_mm(a, a, precision))


def unit_exponents(x: jax.Array, axis: Any) -> jax.Array:
  """`e` with `max|x| / 2^e` in [0.5, 1) over `axis` (keepdims; 0 for 0/Inf):
  `x * 2^-e` is exact and its squares neither overflow nor underflow."""
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  _, e = jnp.frexp(amax.astype(compute_dtype(amax.dtype)))
  return jnp.where(jnp.isfinite(amax), e, 0)


def power_of_two_normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(x / 2^e, e)` per matrix of `(..., m, n)`, exact, with `max|x| / 2^e` in
  [0.5, 1); `e` is int32 `(..., 1, 1)`, 0 for zero or non-finite matrices."""
  exponent = unit_exponents(x, (-2, -1))
  # x * 2^-e in two exact steps (each factor, and each partial product, is
  # a normal number). `jnp.ldexp(x, -e)` gives the same values but passes
  # the tangent of a zero entry through unscaled (jax 0.10.2), which made
  # derivatives through the methods wrong.
  real = jnp.real(x).dtype
  half = exponent // 2
  one = jnp.ones((), real)
  scaled = x * jnp.ldexp(one, -half).astype(real)
  scaled = scaled * jnp.ldexp(one, half - exponent).astype(real)
  return scaled.astype(x.dtype), exponent


def compute_dtype(dtype: Any) -> Any:
  """complex64 for complex, float64 for float64 (x64), else float32."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.complex64
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def conj_transpose(x: jax.Array) -> jax.Array:
  """Conjugate transpose of the last two axes (the transpose if real)."""
  return jnp.swapaxes(x, -1, -2).conj()


def lapack_per_matrix(fn: Callable[..., Any], *xs: jax.Array) -> Any:
  """`fn(*xs)` for a LAPACK-backed `fn` of `(..., m, n)` arrays, one matrix
  per call on CPU, also under `jax.vmap` (docs/reliability.md: LAPACK)."""
  if jax.default_backend() != "cpu":
    return fn(*xs)
  return _guarded(fn, *xs)


def _map_matrices(fn: Callable[..., Any], xs: tuple, guard: bool) -> Any:
  """`fn(*xs)` as a `lax.map` over the matrices of the leading batch axes."""
  call = (lambda *a: _guarded_one(fn, *a)) if guard else fn
  batch = xs[0].shape[:-2]
  if math.prod(batch) <= 1:
    return call(*xs)
  flat = tuple(x.reshape((-1,) + x.shape[len(batch) :]) for x in xs)
  out = jax.lax.map(lambda args: call(*args), flat)
  return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _guarded(fn: Callable[..., Any], *xs: jax.Array) -> Any:
  return _map_matrices(fn, xs, guard=True)


@_guarded.defjvp
def _guarded_jvp(fn, primals, tangents):
  # custom_vmap has no reverse mode: derivatives take the plain map.
  return jax.jvp(
    lambda *a: _map_matrices(fn, a, guard=False), primals, tangents
  )


def _guarded_one(fn: Callable[..., Any], *xs: jax.Array) -> Any:
  """`fn(*xs)`; under `jax.vmap`, one matrix per call again."""
  one = jax.custom_batching.custom_vmap(lambda *a: fn(*a))

  @one.def_vmap
  def rule(axis_size, in_batched, *args):
    args = tuple(
      a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
      for a, b in zip(args, in_batched)
    )
    out = _map_matrices(fn, args, guard=True)
    return out, jax.tree.map(lambda _: True, out)

  return one(*xs)


def finite_matrices(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(x, finite)`: zeros for each matrix with a NaN/Inf, a `(..., 1, 1)` mask.

  LAPACK's SVD can loop forever on non-finite input; `restore_non_finite`
  makes those matrices' results NaN again afterwards."""
  finite = jnp.all(jnp.isfinite(x), axis=(-2, -1), keepdims=True)
  return jnp.where(finite, x, jnp.zeros((), x.dtype)), finite


def restore_non_finite(out: jax.Array, finite: jax.Array) -> jax.Array:
  """`out`, with NaN for every matrix that `finite_matrices` sanitized."""
  # inf - inf: a NaN is made only where a matrix was non-finite (a NaN
  # constant would trip `jax.debug_nans` on every call).
  inf = jnp.where(finite, 0.0, jnp.inf).astype(out.dtype)
  return jnp.where(finite, out, inf - inf)
