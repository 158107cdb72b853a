"""The one door to optax helpers that optax does not export publicly.

Each helper takes optax's public name where one exists, else the private
one where present, else our own implementation with the same numbers
(`tests/test_optax_compat.py` removes the optax names and compares). The
lookup happens at each call, not at import.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp


def optax_name(*paths: str) -> Optional[Callable[..., Any]]:
  """The first of `paths` (`"module:name"`) that exists, else `None`."""
  for path in paths:
    module_name, name = path.split(":")
    try:
      module = importlib.import_module(module_name)
    except ImportError:
      continue
    found = getattr(module, name, None)
    if found is not None:
      return found
  return None


def _axes(a: Any, ndim: int) -> tuple[int, ...]:
  return tuple(i % ndim for i in ((a,) if isinstance(a, int) else a))


def _own_orthogonalize(
  x: jax.Array,
  ns_coeffs: jax.Array,
  ns_steps: Any,
  preconditioning: str,
  eps: Any,
  dimension_numbers: Any,
) -> jax.Array:
  # At call time (no import cycle); the module, not the package's function.
  ns_lib = importlib.import_module("htmuon_jax.methods._newton_schulz")
  coeffs = jnp.asarray(ns_coeffs)
  if coeffs.ndim == 2:  # optax runs every row of a table.
    ns_steps = coeffs.shape[0]
  if dimension_numbers is None and x.ndim != 2:
    raise ValueError(
      "Input must have shape (m, n) or weight dimension numbers must be "
      f"provided. Got shape={x.shape} and dimension_numbers=None."
    )
  dims = dimension_numbers
  red = (0,) if dims is None else _axes(dims.reduction_axis, x.ndim)
  out = (1,) if dims is None else _axes(dims.output_axis, x.ndim)
  order = tuple(a for a in range(x.ndim) if a not in red + out) + red + out
  y = jnp.transpose(x, order)
  size = lambda axes: math.prod(x.shape[a] for a in axes)
  z = ns_lib.newton_schulz(
    y.reshape(y.shape[: x.ndim - len(red + out)] + (size(red), size(out))),
    ns_coeffs=coeffs,
    ns_steps=ns_steps,
    preconditioning=preconditioning,
    eps=eps,
  )
  return jnp.transpose(
    z.reshape(y.shape), tuple(order.index(a) for a in range(x.ndim))
  )


def orthogonalize_via_newton_schulz(
  x: jax.Array,
  ns_coeffs: jax.Array,
  ns_steps: Any = 5,
  preconditioning: str = "frobenius",
  eps: Any = 1e-8,
  dimension_numbers: Any = None,
) -> jax.Array:
  """`optax.contrib.muon`'s orthogonalization of `x`, with optax's arguments
  (private in optax 0.2.8; fallback: the package's `newton_schulz`)."""
  fn = optax_name(
    "optax.contrib:orthogonalize_via_newton_schulz",
    "optax.contrib._muon:orthogonalize_via_newton_schulz",
  )
  if fn is None:
    return _own_orthogonalize(
      x, ns_coeffs, ns_steps, preconditioning, eps, dimension_numbers
    )
  return fn(
    x,
    ns_coeffs=ns_coeffs,
    ns_steps=ns_steps,
    preconditioning=preconditioning,
    eps=eps,
    dimension_numbers=dimension_numbers,
  )
