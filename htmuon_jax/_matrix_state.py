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

from htmuon_jax import _batching as batching
from htmuon_jax import _layouts as dn
from htmuon_jax import sharding as sharding_lib


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
    lambda d, p: (
      optax.MaskedNode() if d is None else init_leaf(matrix_shape(p.shape, d))
    ),
    dim_tree,
    params,
  )


def update_per_matrix(
  fn: Callable[..., Any],
  updates: Any,
  state: Any,
  weight_dimension_numbers: dn.WeightDimNumOrFn,
  execution: sharding_lib.Execution = sharding_lib.DEFAULT_EXECUTION,
  args: Sequence[Any] = (),
  *,
  transpose_equivariant: bool = False,
) -> tuple[Any, Any]:
  """Maps `fn` over the matrix leaves: the package's one per-matrix executor.

  Every per-matrix step of the package runs through it: the spectral
  methods (stateless, or with a per-matrix state such as the streaming
  basis), the row normalization, and NorMuon's and AdaMuon's second
  moments. With `state=None` the step is stateless: `fn(matrices, *args)`
  returns the new stack and no state is carried.

  With `execution.distribute`, the matrix leaves (and their state leaves)
  travel
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
    fn: `fn(matrices, state_leaf, *args) -> (new_matrices, new_state_leaf)`,
      or `fn(matrices, *args) -> new_matrices` when `state` is None.
      `matrices` is the `(batch, fan_in, fan_out)` stack of a matrix leaf;
      the new stack may have any float dtype (it is cast back to the leaf's).
      It must act on each batch entry independently. With `distribute` the
      state leaf must be a pytree of arrays with the same leading batch axis
      (as `init_per_matrix` makes from `matrix_shape`), and `fn` must accept
      all-zero matrices and state (the padding of a group; their results
      are dropped).
    updates: the update tree.
    state: a tree made by `init_per_matrix` for the same leaves, or None
      (stateless).
    weight_dimension_numbers: as for `init_per_matrix`.
    execution: how the step runs, as the transformations built it once at
      construction (`htmuon_jax.sharding.as_execution`): its `distribute`
      (`None`: GSPMD partitions `fn`, one traced step per shape group as
      its `grouping` says; else the distributed step) and its
      `memory_budget`.
    args: extra arguments of `fn`, e.g. hyperparameters. Traced ones (an
      injected `power`) are passed as arguments into the auto-axes and
      `shard_map` regions, which cannot close over them; concrete ones stay
      Python values.
    transpose_equivariant: stateless steps only: `fn(x^T) = fn(x)^T` holds
      (true of the spectral power), so with `distribute` tall matrices join
      the group of their wide transposes (fewer, fuller groups).

  Returns:
    `(new_updates, new_state)` (`new_state` is None when `state` is);
    non-matrix leaves pass through unchanged.
  """
  stateless = state is None
  if transpose_equivariant and not stateless:
    raise ValueError(
      "update_per_matrix: transpose_equivariant needs a stateless step."
    )
  dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, updates)
  dims, treedef = jax.tree.flatten(
    dim_tree, is_leaf=lambda x: x is None or dn.is_dimension_numbers(x)
  )
  # jax.tree.flatten returns a PyTreeDef; its stubs lack flatten_up_to.
  leaves = treedef.flatten_up_to(updates)  # type: ignore[attr-defined]
  states = [None] * len(leaves) if stateless else treedef.flatten_up_to(state)  # type: ignore[attr-defined]
  idx = [i for i, d in enumerate(dims) if d is not None]
  if stateless:
    item_fn = fn
  else:
    item_fn = lambda item, *a: fn(item[0], item[1], *a)
  # Only traced args travel as arguments; concrete ones stay Python values.
  call, traced = sharding_lib.bind_static_args(item_fn, args)

  def run(
    xs: tuple[list[jax.Array], list[Any]], *a: Any
  ) -> tuple[list[jax.Array], list[Any]]:
    us, ss = xs
    ds = [dims[i] for i in idx]
    mats = [dn.to_matrices(u, d) for u, d in zip(us, ds)]
    items = mats if stateless else list(zip(mats, ss))
    if execution.distribute is None:
      # One traced step per shape group, in memory-bounded chunks.
      results = batching.grouped_apply(
        call,
        items,
        args=a,
        transpose_equivariant=transpose_equivariant,
        budget=execution.memory_budget,
        grouping=execution.grouping,
      )
    else:
      results = sharding_lib.grouped_map(
        call,
        items,
        execution,
        args=a,
        transpose_equivariant=transpose_equivariant,
      )
    if stateless:
      results = [(r, None) for r in results]
    new_us, new_ss = [], []
    for (out, new_s), d, u, s in zip(results, ds, us, ss):
      out = dn.from_matrices(out.astype(u.dtype), d, u.shape)
      if execution.distribute is not None:
        # Back to the input's layout (one all-to-all), not GSPMD's choice.
        out = shard_alike(out, u)[0]
        new_s = jax.tree.map(lambda n, o: shard_alike(n, o)[0], new_s, s)
      new_us.append(out)
      new_ss.append(new_s)
    return new_us, new_ss

  # Under explicit mesh axes, linear algebra on sharded matrix axes needs an
  # auto-axes region (outputs keep the inputs' shardings).
  new_us, new_ss = sharding_lib.with_auto_axes(
    run, ([leaves[i] for i in idx], [states[i] for i in idx]), *traced
  )
  new_leaves = list(leaves)
  new_states = list(states)
  for i, u, s in zip(idx, new_us, new_ss):
    new_leaves[i], new_states[i] = u, s
  new_updates = jax.tree.unflatten(treedef, new_leaves)
  if stateless:
    return new_updates, None
  return new_updates, jax.tree.unflatten(treedef, new_states)
