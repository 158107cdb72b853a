"""Argument checks shared by the transformations and optimizers.

Each raises a `ValueError` naming the parameter. Traced values (e.g.
hyperparameters injected by `optax.inject_hyperparams` under jit) cannot be
checked at construction and pass.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = [
  "PRECISIONS",
  "check_eps",
  "check_power",
  "check_precision",
  "check_range",
  "concrete_scalar",
]

# Matrix-product precision of the product-only methods ("polynomial",
# "newton_schulz"): "accurate" (float32, the polynomial at HIGHEST) or "fast"
# (bfloat16 operands, float32 accumulation). Other methods ignore it.
PRECISIONS = ("accurate", "fast")


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
    raise ValueError(
      f"{name} must be in [{low}, {high}{bracket}, got {value!r}."
    )


def check_power(power: Any, *, name: str = "power") -> None:
  """A spectral exponent: in [0, 1]."""
  check_range(power, name, 0.0, 1.0)


def check_eps(eps: Any, *, name: str = "eps") -> None:
  """A relative singular-value cutoff: in [0, 1)."""
  check_range(eps, name, 0.0, 1.0, high_open=True)


def check_precision(precision: str) -> None:
  """Raises ValueError for an unknown `precision`."""
  if precision not in PRECISIONS:
    raise ValueError(
      f"precision: unknown value {precision!r}; expected one of {PRECISIONS}."
    )
