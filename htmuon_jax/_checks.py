"""Argument checks, run once at construction; each ValueError names the argument.

Traced values (hyperparameters injected by `optax.inject_hyperparams` under
jit) cannot be checked before the step and pass.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Matrix-product precision of the product-only methods (docs/methods.md).
PRECISIONS = ("auto", "accurate", "fast")


def concrete_scalar(value: Any, name: str) -> float | None:
  """`value` as a float, None if traced; ValueError unless a real scalar."""
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
  """ValueError if a concrete `value` is outside [low, high] (or [low, high))."""
  v = concrete_scalar(value, name)
  if v is not None and not (low <= v < high if high_open else low <= v <= high):
    bracket = ")" if high_open else "]"
    raise ValueError(
      f"{name} must be in [{low}, {high}{bracket}, got {value!r}."
    )


def check_nonnegative(value: Any, name: str) -> None:
  """ValueError if a concrete `value` is negative."""
  check_range(value, name, 0.0, float("inf"))


def check_learning_rate(
  value: Any, name: str, *, optional: bool = False
) -> None:
  """A finite scalar >= 0, or a schedule (checked at step 0)."""
  if value is None:
    if optional:
      return
    raise ValueError(
      f"{name}: expected a scalar or an optax schedule, got None (the "
      "update would be the raw, unscaled direction)."
    )
  what = ""
  if callable(value):
    value, what = value(0), " at step 0"
  v = concrete_scalar(value, name)
  if v is not None and (not np.isfinite(v) or v < 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {v!r}{what}.")


def check_mu_dtype(mu_dtype: Any) -> Any:
  """`mu_dtype` canonicalized; ValueError unless None or a float dtype."""
  if mu_dtype is None:
    return None
  mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype)
  if not jnp.issubdtype(mu_dtype, jnp.inexact):
    raise ValueError(
      f"mu_dtype must be None or a floating-point dtype, got {mu_dtype!r} "
      "(an integer momentum truncates every update to 0)."
    )
  return mu_dtype


def check_interval(interval: Any) -> None:
  """ValueError unless a concrete `interval` is None or an int >= 1."""
  v = None if interval is None else concrete_scalar(interval, "interval")
  if v is not None and (v < 1 or v != int(v)):
    raise ValueError(f"interval must be None or an int >= 1, got {interval!r}.")


def resolve_precision(precision: str, backend: str | None = None) -> str:
  """`"auto"` is `"accurate"` on CPU (fp32 products cost no more there), else
  `"fast"`; evidence in BENCHMARKS.md ("Accelerator cost", "Method quality")."""
  check_precision(precision)
  if precision != "auto":
    return precision
  return "accurate" if (backend or jax.default_backend()) == "cpu" else "fast"


def check_precision(precision: str) -> None:
  """ValueError for an unknown `precision`."""
  if precision not in PRECISIONS:
    raise ValueError(
      f"precision: unknown value {precision!r}; expected one of {PRECISIONS}."
    )
