"""Helpers for tests and benchmarks (nothing in an update uses them).

`count_collectives` reads compiled XLA programs. `orthogonalize_via_newton_schulz`
is `optax.contrib.muon`'s own orthogonalization, the reference the tests and
benchmarks compare with: the one door to optax's private names (optax's
public name where one exists, else the private one, else the package's
`newton_schulz` with the same numbers; looked up at each call).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp

from htmuon_jax.methods._newton_schulz import newton_schulz

__all__ = [
  "COLLECTIVES",
  "count_collectives",
  "optax_name",
  "orthogonalize_via_newton_schulz",
]

COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "all-to-all",
  "reduce-scatter",
  "collective-permute",
)
# `%name = <shape> op(...)`; the op is the first ` word(` after the `=`
# (tuple shapes contain spaces and `/*index=5*/` comments, never ` word(`).
_INSTR = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\("
)
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(
  r"(?:body|condition|to_apply|calls|branch_computations)=\{?([%\w.\-, ]+)"
)


def count_collectives(compiled: Any) -> dict[str, dict[str, int]]:
  """Counts the collectives of a compiled XLA program, in and out of loops.

  Args:
    compiled: a `jax.stages.Compiled` (`jax.jit(f).lower(...).compile()`) or
      its HLO text.

  Returns:
    `{"total": {op: n}, "in_loop": {op: n}}` for the ops in `COLLECTIVES`
    (async `*-start` forms count once); `in_loop` counts those in the body or
    condition of a `while` loop, or in computations these call.
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  ops: dict[str, list[str]] = {}
  callees: dict[str, set[str]] = {}
  loop_roots: set[str] = set()
  current = None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head and "=" not in line.split("{")[0]:
      current = head.group(1)
      ops.setdefault(current, [])
      callees.setdefault(current, set())
      continue
    match = _INSTR.match(line)
    if current is None or not match:
      continue
    op = match.group(1)
    op = op[: -len("-start")] if op.endswith("-start") else op
    ops[current].append(op)
    for group in _CALLEE.findall(line):
      names = {n.strip().lstrip("%") for n in group.split(",") if n.strip()}
      callees[current] |= names
      if op == "while":
        loop_roots |= names
  in_loop, todo = set(), list(loop_roots)
  while todo:
    name = todo.pop()
    if name not in in_loop:
      in_loop.add(name)
      todo.extend(callees.get(name, ()))

  def tally(names: Any) -> dict[str, int]:
    return {c: sum(ops.get(n, []).count(c) for n in names) for c in COLLECTIVES}

  return {"total": tally(ops), "in_loop": tally(in_loop)}


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
  preconditioning: Any,
  eps: Any,
  dimension_numbers: Any,
) -> jax.Array:
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
  z = newton_schulz(
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
  preconditioning: Any = "frobenius",
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
