"""Argument checks shared by the transformations and optimizers.

Each raises a `ValueError` naming the parameter. Traced values (e.g.
hyperparameters injected by `optax.inject_hyperparams` under jit) cannot be
checked at construction and pass.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


# Matrix-product precision of the product-only methods ("polynomial", "express",
# "newton_schulz"): "accurate" (float32, the polynomial at HIGHEST) or "fast"
# (bfloat16 operands, float32 accumulation), or "auto" (the default):
# "accurate" on CPU, "fast" on GPU/TPU (`resolve_precision`). Other methods
# ignore it.
PRECISIONS = ("auto", "accurate", "fast")


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


def check_learning_rate(value: Any, name: str = "learning_rate") -> None:
  """A learning rate: a finite scalar >= 0, or a schedule (checked at step 0).

  Every alias calls it on its `learning_rate` and `adam_learning_rate`
  before building anything, so `htmuon(-0.01)` fails at construction rather
  than training uphill. `None` passes (an optional learning rate's default);
  traced values pass (they cannot be checked before the step).

  Raises:
    ValueError: naming `name`, if the value (or a schedule's value at step
      0) is negative, NaN or infinite.
  """
  if value is None:
    return
  what = ""
  if callable(value):
    value = value(0)
    what = " at step 0"
  v = concrete_scalar(value, name)
  if v is None:
    return
  if not np.isfinite(v) or v < 0:
    raise ValueError(f"{name} must be a finite number >= 0, got {v!r}{what}.")


def check_learning_rates(learning_rate: Any, adam_learning_rate: Any) -> None:
  """`check_learning_rate` on an alias's two learning rates (one line each)."""
  check_learning_rate(learning_rate, "learning_rate")
  check_learning_rate(adam_learning_rate, "adam_learning_rate")


def resolve_precision(precision: str, backend: str | None = None) -> str:
  """The precision that runs: `"auto"` is `"accurate"` on CPU, else `"fast"`.

  On a CPU the fp32 products cost no more than bf16 ones, so `"auto"` keeps
  the accurate numbers there; on GPUs and TPUs it takes the bf16-operand
  products (`"fast"`; costs and accuracy in BENCHMARKS.md, "Accelerator
  cost" and "Method quality").

  Args:
    precision: `"auto"`, `"accurate"` or `"fast"`.
    backend: the JAX backend name; `jax.default_backend()` if omitted.

  Returns:
    `"accurate"` or `"fast"`.
  """
  check_precision(precision)
  if precision != "auto":
    return precision
  if backend is None:
    backend = jax.default_backend()
  return "accurate" if backend == "cpu" else "fast"


def check_precision(precision: str) -> None:
  """Raises ValueError for an unknown `precision`."""
  if precision not in PRECISIONS:
    raise ValueError(
      f"precision: unknown value {precision!r}; expected one of {PRECISIONS}."
    )
