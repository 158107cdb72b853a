"""Per-matrix optimizer state: one state leaf per matrix leaf of the params.

The stateful variants (the streaming basis, NorMuon's and AdaMuon's second
moments) keep an array for each matrix leaf, laid out like the
`(batch, fan_in, fan_out)` stack that `dimension_numbers.to_matrices` makes,
and an `optax.MaskedNode` (an empty subtree) for every other leaf, so
non-matrix leaves cost no state and the state tree has the params' structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from htmuon_jax import dimension_numbers as dn
from htmuon_jax import sharding as sharding_lib

__all__ = ["init_per_matrix", "update_per_matrix", "matrix_shape"]


def matrix_shape(shape: tuple[int, ...], d: Any) -> tuple[int, int, int]:
  """`(batch, fan_in, fan_out)` of a leaf of `shape` under dimension numbers `d`."""
  return jax.eval_shape(
      lambda x: dn.to_matrices(x, d), jax.ShapeDtypeStruct(shape, "float32")
  ).shape


def init_per_matrix(
    init_leaf: Callable[[tuple[int, int, int]], Any],
    params: Any,
    weight_dimension_numbers: dn.WeightDimNumOrFn,
) -> Any:
  """`init_leaf(matrix_shape)` for matrix leaves, `MaskedNode()` for others."""
  dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, params)
  return dn.map_with_dimension_numbers(
      lambda d, p: optax.MaskedNode() if d is None
      else init_leaf(matrix_shape(p.shape, d)),
      dim_tree, params)


def update_per_matrix(
    fn: Callable[[jax.Array, Any], tuple[jax.Array, Any]],
    updates: Any,
    state: Any,
    weight_dimension_numbers: dn.WeightDimNumOrFn,
) -> tuple[Any, Any]:
  """Maps `fn(matrices, state_leaf) -> (matrices, state_leaf)` over matrices.

  Args:
    fn: takes the `(batch, fan_in, fan_out)` stack of a matrix leaf and its
      state leaf; returns the new stack (any float dtype; cast back to the
      leaf's dtype) and the new state leaf.
    updates: the update tree.
    state: a tree made by `init_per_matrix` for the same leaves.
    weight_dimension_numbers: as for `init_per_matrix`.

  Returns:
    `(new_updates, new_state)`; non-matrix leaves pass through unchanged.
  """
  dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, updates)

  def apply(d: Any, u: jax.Array, s: Any) -> tuple[jax.Array, Any]:
    if d is None:
      return u, s

    def run(xs: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
      u_, s_ = xs
      out, new_s = fn(dn.to_matrices(u_, d), s_)
      return dn.from_matrices(out.astype(u_.dtype), d, u_.shape), new_s

    # Under explicit mesh axes, linear algebra on sharded matrix axes needs
    # an auto-axes region (outputs keep the inputs' shardings).
    return tuple(sharding_lib.with_auto_axes(run, (u, s)))

  pairs = dn.map_with_dimension_numbers(apply, dim_tree, updates, state)
  first = dn.map_with_dimension_numbers(lambda _, p: p[0], dim_tree, pairs)
  second = dn.map_with_dimension_numbers(lambda _, p: p[1], dim_tree, pairs)
  return first, second
