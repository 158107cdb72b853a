"""Numerical helpers shared by the spectral methods.

* `power_of_two_normalize`: the exact per-matrix rescaling every method
  applies before squaring a matrix (Gram matrices of 1e30 or 1e-30 inputs
  then neither overflow nor underflow fp32).
* `lapack_per_matrix`: runs batched LAPACK calls one matrix at a time on
  multi-device CPU hosts, where the batched kernels can hang.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "HIGHEST",
    "compute_dtype",
    "conj_transpose",
    "lapack_per_matrix",
    "power_of_two_normalize",
]

HIGHEST = jax.lax.Precision.HIGHEST


def power_of_two_normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(x / 2^e, e)` per matrix, with `max|x| / 2^e` in [0.5, 1) (e = 0 for 0).

  Args:
    x: array `(..., m, n)`.

  Returns:
    The scaled array (dtype of `x`; exact, a power of two) and the int32
    exponents `e` of shape `(..., 1, 1)`. Non-finite matrices get `e = 0`.
  """
  max_abs = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  _, exponent = jnp.frexp(max_abs.astype(jnp.float32))
  exponent = jnp.where(jnp.isfinite(max_abs), exponent, 0)
  if jnp.iscomplexobj(x):  # ldexp takes real arrays: scale each part (exact).
    scaled = jax.lax.complex(jnp.ldexp(x.real, -exponent),
                             jnp.ldexp(x.imag, -exponent))
    return scaled.astype(x.dtype), exponent
  return jnp.ldexp(x, -exponent).astype(x.dtype), exponent


def compute_dtype(dtype: Any) -> Any:
  """The dtype the methods compute in: complex64 for complex, else float32."""
  complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
  return jnp.complex64 if complex_ else jnp.float32


def conj_transpose(x: jax.Array) -> jax.Array:
  """Conjugate transpose of the last two axes (the transpose if real)."""
  return jnp.swapaxes(x, -1, -2).conj()


def lapack_per_matrix(fn: Callable[..., Any], *xs: jax.Array) -> Any:
  """`fn(*xs)` for a LAPACK-backed `fn`, one matrix per call on multi-CPU.

  jaxlib's CPU kernels for batched QR, eigh, Cholesky and triangular solves
  split the batch over XLA's intra-op thread pool and block that thread
  until the pieces are done. With several CPU devices in one process
  (`--xla_force_host_platform_device_count`, the usual way to test sharding)
  every pool thread can end up blocked so, the pieces never run, and the
  program hangs (seen with jax 0.10.2 and 8 devices: a batch of two 256 x 256
  QRs after an all-reduce or an all-to-all; `tests/lapack_batch_cases.py`).
  A single matrix per call is never split, so on such hosts the batch runs as
  a `lax.map`. Accelerators and single-device CPU runs keep the batched call.

  Args:
    fn: a function of `(..., m, n)` arrays with the same leading batch axes.
    *xs: its arguments.

  Returns:
    `fn(*xs)`.
  """
  batch = xs[0].shape[:-2]
  if (math.prod(batch) <= 1 or jax.default_backend() != "cpu"
      or jax.local_device_count() <= 1):
    return fn(*xs)
  flat = tuple(x.reshape((-1,) + x.shape[len(batch):]) for x in xs)
  out = jax.lax.map(lambda args: fn(*args), flat)
  return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)
