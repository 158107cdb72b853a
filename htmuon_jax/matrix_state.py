"""Per-matrix optimizer state: one state leaf per matrix leaf of the params.

The stateful variants (the streaming basis, NorMuon's and AdaMuon's second
moments) keep an array for each matrix leaf, laid out like the
`(batch, fan_in, fan_out)` stack that `dimension_numbers.to_matrices` makes
(AdaMuon's elementwise moment is kept in the parameter's own layout
instead), and an `optax.MaskedNode` (an empty subtree) for every other leaf,
so non-matrix leaves cost no state and the state tree has the params'
structure. A state type registers its per-matrix fields with the class
decorator `htmuon_jax.sharding.per_matrix_state`, so that
`htmuon_jax.sharding.state_shardings` splits them over their parameters'
mesh axes along the batch axis (the rows for a single matrix), even where a
leaf's shape equals its parameter's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from jax.experimental.shard_alike import shard_alike

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
    fn: Callable[..., tuple[jax.Array, Any]],
    updates: Any,
    state: Any,
    weight_dimension_numbers: dn.WeightDimNumOrFn,
    distribute: sharding_lib.DistributeLike = None,
    args: Sequence[Any] = (),
) -> tuple[Any, Any]:
  """Maps `fn(matrices, state_leaf, *args)` over the matrix leaves.

  With `distribute`, the matrix leaves and their state leaves travel
  together through `htmuon_jax.sharding.grouped_map`: leaves whose matrices
  and state leaves have equal shapes and dtypes form a group, spread whole
  over the devices (one all-to-all in and one out per group), and `fn` runs
  locally on each device. Each new update gets its input's sharding back and
  each new state leaf its old state leaf's: state split along its batch axis
  (`htmuon_jax.sharding.state_shardings` of a stacked parameter) stays where
  it is, state split along another axis moves with its matrix by
  all-to-all, and none is gathered. Under explicit mesh axes the work runs
  in an auto-axes region either way.

  Args:
    fn: takes the `(batch, fan_in, fan_out)` stack of a matrix leaf, its
      state leaf and `args`; returns the new stack (any float dtype; cast
      back to the leaf's dtype) and the new state leaf. It must act on each
      batch entry independently. With `distribute` the state leaf must be a
      pytree of arrays with the same leading batch axis (as `init_per_matrix`
      makes from `matrix_shape`), and `fn` must accept all-zero matrices and
      state (the padding of a group; their results are dropped).
    updates: the update tree.
    state: a tree made by `init_per_matrix` for the same leaves.
    weight_dimension_numbers: as for `init_per_matrix`.
    distribute: `None` (GSPMD partitions `fn`), or where to run the
      distributed step; see `htmuon_jax.sharding.as_distribute`.
    args: extra arguments of `fn`, e.g. hyperparameters. Traced ones (an
      injected `power`) are passed as arguments into the auto-axes and
      `shard_map` regions, which cannot close over them; concrete ones stay
      Python values.

  Returns:
    `(new_updates, new_state)`; non-matrix leaves pass through unchanged.
  """
  sharding_lib.as_distribute(distribute)  # Validates before tracing.
  dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, updates)
  call, traced = sharding_lib.bind_static_args(
      lambda item, *a: fn(*item, *a), args)

  if distribute is None:
    def apply(d: Any, u: jax.Array, s: Any) -> tuple[jax.Array, Any]:
      if d is None:
        return u, s

      def run(xs: tuple[jax.Array, Any], *a: Any) -> tuple[jax.Array, Any]:
        u_, s_ = xs
        out, new_s = call((dn.to_matrices(u_, d), s_), *a)
        return dn.from_matrices(out.astype(u_.dtype), d, u_.shape), new_s

      # Under explicit mesh axes, linear algebra on sharded matrix axes needs
      # an auto-axes region (outputs keep the inputs' shardings).
      return tuple(sharding_lib.with_auto_axes(run, (u, s), *traced))

    pairs = dn.map_with_dimension_numbers(apply, dim_tree, updates, state)
  else:
    matrices: list[tuple[Any, jax.Array, Any]] = []

    def collect(d: Any, u: jax.Array, s: Any) -> None:
      if d is not None:
        matrices.append((d, u, s))

    dn.map_with_dimension_numbers(collect, dim_tree, updates, state)
    dims = [d for d, _, _ in matrices]

    def run_all(xs: tuple[list[jax.Array], list[Any]], *a: Any) -> tuple[
        list[jax.Array], list[Any]]:
      us, ss = xs
      items = [(dn.to_matrices(u, d), s) for d, u, s in zip(dims, us, ss)]
      results = sharding_lib.grouped_map(call, items, distribute, args=a)
      new_us, new_ss = [], []
      for (out, new_s), d, u, s in zip(results, dims, us, ss):
        out = dn.from_matrices(out.astype(u.dtype), d, u.shape)
        # Back to the input's layout (one all-to-all), not GSPMD's choice.
        new_us.append(shard_alike(out, u)[0])
        new_ss.append(jax.tree.map(lambda n, o: shard_alike(n, o)[0],
                                   new_s, s))
      return new_us, new_ss

    new_us, new_ss = sharding_lib.with_auto_axes(
        run_all, ([u for _, u, _ in matrices], [s for _, _, s in matrices]),
        *traced)
    results = iter(zip(new_us, new_ss))
    pairs = dn.map_with_dimension_numbers(
        lambda d, u, s: (u, s) if d is None else next(results),
        dim_tree, updates, state)

  first = dn.map_with_dimension_numbers(lambda _, p: p[0], dim_tree, pairs)
  second = dn.map_with_dimension_numbers(lambda _, p: p[1], dim_tree, pairs)
  return first, second
