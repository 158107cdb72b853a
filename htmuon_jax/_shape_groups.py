"""A leafwise transformation traced once per shape group of leaves.

`batching` runs the spectral step once per group of equal matrix shapes,
but the rest of an optimizer's chain (momentum, Nesterov, shape scaling,
weight decay, the learning rate, AdamW for the other leaves) is an
elementwise `jax.tree.map`: its ops are written out once per leaf, so the
program still grew by ~230 StableHLO lines per layer of a LLaMA tree.
`group_leaves` runs a whole chain once per group instead: leaves of equal
shape, dtype, dimension numbers and weight-decay mask are stacked along a
new leading (batch) axis (one `concatenate` per group), the chain runs on
the tree of group stacks, and the results are sliced back (one `slice` per
leaf). The chain sees each stack as a batch of matrices (its dimension
numbers shifted by one axis), so its per-leaf rules apply to every member.

The optimizer state keeps the per-leaf layout of `inner.init(params)` (so
checkpoints, `state_shardings` and `optax.tree_map_params` see what they
would without grouping); it is stacked on entry and split on exit. How a
state leaf is stacked is read from the chain's own state for the grouped
tree (`jax.eval_shape` of its `init`): a leaf in the parameter's layout is
stacked along a new axis, a per-matrix leaf (`(batch, ...)`, see
`matrix_state`) is concatenated along its batch axis.

Whether leaves are grouped follows the optimizer's `Execution.grouping`
(by default on one accelerator device; each leaf on its own on CPU, see
`batching`), and only on one device: a sharded leaf's layout is not
visible while tracing, and stacking per-matrix state split along its rows
made XLA reshard it (measured on 8 CPU devices, `grouping="shapes"`,
`htmuon(method=
"stream")` and `htnormuon`: 11 all-to-alls where the per-leaf chain has
none). A stacked leaf too large for one memory chunk stays on its own, as
in `batching.grouped_apply` (joining would copy it).

The cost of grouping is the copy into each group's stack (updates, state
and parameters; XLA does not fuse a concatenate of that many operands into
its consumers): on an abstract LLaMA-1B tree of 24 separate layers, XLA's
temporaries grow from 12.5 to 16.5 GiB (optax muon's: 31.2 GiB) while the
program shrinks from 7,022 to 2,374 StableHLO lines (BENCHMARKS.md,
"Compile cost").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from htmuon_jax import _batching as batching
from htmuon_jax import _layouts as dn
from htmuon_jax import _matrix_state as matrix_state


# `build(dims, mask)`: the chain for a tree, given a dimension-number
# callable for it (or None, for a branch without matrices) and its weight
# decay mask (None, or a tree of bools like it).
Build = Callable[
  [Optional[Callable[[Any], Any]], Any], optax.GradientTransformation
]


class _Plan(NamedTuple):
  """Which leaves of a tree share a group; packs per-leaf trees into group
  trees (a tuple, one entry per group) and back."""

  treedef: Any  # of the leaves (MaskedNodes are empty subtrees)
  groups: tuple[tuple[int, ...], ...]  # leaf indices, per group
  dims: tuple[Any, ...]  # the group stacks' dimension numbers (or None)
  masks: Optional[tuple[bool, ...]]  # the groups' decay flags (or None)

  def is_leaf_like(self, x: Any) -> bool:
    """A subtree with one slot per leaf of the plan's tree."""
    try:
      self.treedef.flatten_up_to(x)
    except (ValueError, TypeError):
      return False
    return True

  def pack(self, x: Any, like: Any = None) -> tuple[Any, ...]:
    """A per-leaf tree `x` as a group tree (its leaves shaped like `like`,
    default: stacked on a new axis)."""
    slots = self.treedef.flatten_up_to(x)
    out = []
    for g, members in enumerate(self.groups):
      parts = [slots[i] for i in members]
      if len(members) == 1:
        out.append(parts[0])
        continue
      k = len(members)
      ref = (
        jax.tree.map(
          lambda a, k=k: jax.ShapeDtypeStruct((k,) + a.shape, a.dtype),
          parts[0],
        )
        if like is None
        else like[g]
      )
      out.append(jax.tree.map(lambda r, *xs: _join(xs, r), ref, *parts))
    return tuple(out)

  def unpack(self, y: tuple[Any, ...], like: Any) -> Any:
    """Group tree `y` back to the layout of the per-leaf tree `like`."""
    slots = list(self.treedef.flatten_up_to(like))
    for members, part in zip(self.groups, y):
      if len(members) == 1:
        slots[members[0]] = part
        continue
      refs = [slots[i] for i in members]
      ref_leaves = [jax.tree.leaves(r) for r in refs]
      part_leaves, part_def = jax.tree.flatten(part)
      per_member: list[list[jax.Array]] = [[] for _ in members]
      for j, leaf in enumerate(part_leaves):
        for m, piece in enumerate(_split(leaf, [r[j] for r in ref_leaves])):
          per_member[m].append(piece)
      for i, pieces in zip(members, per_member):
        slots[i] = jax.tree.unflatten(part_def, pieces)
    return self.treedef.unflatten(slots)


def _shift(d: MuonDimensionNumbers, ndim: int) -> MuonDimensionNumbers:
  """`d` for the leaf stacked along a new leading (batch) axis."""
  axes = lambda a: tuple(
    x % ndim + 1 for x in ((a,) if isinstance(a, int) else a)
  )
  return MuonDimensionNumbers(axes(d.reduction_axis), axes(d.output_axis))


def _runs_alone(leaf: jax.Array, d: Any, budget: Optional[int]) -> bool:
  """A stacked leaf too large for one chunk (see `batching.grouped_apply`)."""
  if d is None:
    return False
  batch, fan_in, fan_out = matrix_state.matrix_shape(leaf.shape, d)
  item = jax.ShapeDtypeStruct((batch, fan_in, fan_out), leaf.dtype)
  return batching.too_large_to_join(item, budget)


def _plan(
  updates: Any,
  leaf_dims: Optional[Callable[[Any], Any]],
  mask: Any,
  budget: Optional[int],
) -> _Plan:
  """Groups the array leaves of `updates` by shape, dtype, dims and mask."""
  leaves, treedef = jax.tree.flatten(updates)
  if leaf_dims is None:
    dims: list[Any] = [None] * len(leaves)
  else:
    dim_tree = dn.resolve_dimension_numbers(leaf_dims, updates)
    dims = treedef.flatten_up_to(dim_tree)  # type: ignore[attr-defined]
  flags: Optional[list[bool]] = None
  if mask is not None:
    mask_tree = mask(updates) if callable(mask) else mask
    full = jax.tree.map(
      lambda m, u: jax.tree.map(lambda _: m, u), mask_tree, updates
    )
    flags = [bool(m) for m in treedef.flatten_up_to(full)]  # type: ignore[attr-defined]
  keyed: dict[Any, list[int]] = {}
  for i, (leaf, d) in enumerate(zip(leaves, dims)):
    if _runs_alone(leaf, d, budget):
      key: Any = ("alone", i)
    else:
      flag = None if flags is None else flags[i]
      # Normalized axes: equal layouts written differently share a group.
      layout = None if d is None else _shift(d, leaf.ndim)
      key = (leaf.shape, jnp.dtype(leaf.dtype), layout, flag)
    keyed.setdefault(key, []).append(i)
  groups = tuple(tuple(m) for m in keyed.values())
  group_dims = []
  for members in groups:
    d, leaf = dims[members[0]], leaves[members[0]]
    if d is not None and len(members) > 1:
      d = _shift(d, leaf.ndim)
    group_dims.append(d)
  masks = None if flags is None else tuple(flags[m[0]] for m in groups)
  return _Plan(treedef, groups, tuple(group_dims), masks)


def _join(xs: Sequence[jax.Array], like: Any) -> jax.Array:
  """Members' leaves as one group leaf shaped like `like`."""
  k, shape = len(xs), xs[0].shape
  if like.shape == (k,) + shape:  # parameter layout: a new leading axis
    if not shape:
      return jnp.stack(xs)
    joined = jax.lax.concatenate(list(xs), 0)
    return joined.reshape((k,) + shape)
  if shape and like.shape == (k * shape[0],) + shape[1:]:  # per-matrix
    return jax.lax.concatenate(list(xs), 0)
  raise ValueError(
    f"group_leaves: cannot join state leaves of shape {shape} into "
    f"{like.shape}."
  )


def _split(y: jax.Array, likes: Sequence[Any]) -> list[jax.Array]:
  """The members' leaves (shaped like `likes`) of a group leaf `y`."""
  k, shape = len(likes), likes[0].shape
  if y.shape == (k,) + shape:
    if not shape:
      return [y[i] for i in range(k)]
    y = y.reshape((k * shape[0],) + shape[1:])
  rows = shape[0]
  return [
    jax.lax.slice_in_dim(y, i * rows, (i + 1) * rows, axis=0) for i in range(k)
  ]


def group_leaves(
  build: Build,
  leaf_dims: Optional[Callable[[Any], Any]] = None,
  mask: Any = None,
  *,
  grouping: str = "auto",
  memory_budget: Optional[int] = batching.DEFAULT_MEMORY_BUDGET,
) -> optax.GradientTransformationExtraArgs:
  """`build(leaf_dims, mask)`, traced once per shape group of leaves.

  Args:
    build: makes the chain for a tree from a dimension-number callable for
      it (`None` when `leaf_dims` is None) and a weight-decay mask for it
      (`None` when `mask` is). The chain must treat leaves independently
      given their dimension numbers and mask (every optax elementwise
      transformation and every piece of this package does), keep its
      state in the tree's layout or per matrix (`matrix_state`), and take
      no per-leaf option other than these two.
    leaf_dims: the dimension numbers of the tree's leaves (as for
      `resolve_dimension_numbers`), or None for a branch of non-matrix
      leaves (grouped by shape and dtype only).
    mask: None, or a tree (or callable) of bools: which leaves decay.
    grouping: one of `batching.GROUPINGS` (the optimizer's
      `Execution.grouping`): `"off"` runs the chain per leaf.
    memory_budget: a stack larger than one chunk of this many bytes stays
      on its own (the optimizer's `Execution.memory_budget`).

  Returns:
    An `optax.GradientTransformationExtraArgs` with the state of
    `build(leaf_dims, mask).init(params)` and its updates (the same to
    float round-off: a grouped reduction may sum in another order).
  """

  batching.check_grouping(grouping)
  batching.check_memory_budget(memory_budget)
  # Built once, at construction (bad hyperparameters raise now).
  inner = optax.with_extra_args_support(build(leaf_dims, mask))

  def update_fn(
    updates: Any, state: Any, params: Any = None, **extra_args: Any
  ) -> tuple[Any, Any]:
    # Several devices: per leaf, whatever the mode (see the module's doc).
    if batching.resolved_grouping(grouping) == "off" or jax.device_count() > 1:
      return inner.update(updates, state, params, **extra_args)
    plan = _plan(updates, leaf_dims, mask, memory_budget)
    if all(len(m) == 1 for m in plan.groups):
      return inner.update(updates, state, params, **extra_args)
    group_dims = None if leaf_dims is None else (lambda _: plan.dims)
    grouped = optax.with_extra_args_support(build(group_dims, plan.masks))
    g_updates = plan.pack(updates)
    g_params = None if params is None else plan.pack(params)
    abstract = jax.eval_shape(
      grouped.init, g_params if g_params is not None else g_updates
    )
    g_state = jax.tree.map(
      lambda x, a: plan.pack(x, a) if plan.is_leaf_like(x) else x,
      state,
      abstract,
      is_leaf=plan.is_leaf_like,
    )
    g_new, g_new_state = grouped.update(
      g_updates, g_state, g_params, **extra_args
    )
    new_state = jax.tree.map(
      lambda x, y: plan.unpack(y, x) if plan.is_leaf_like(x) else y,
      state,
      g_new_state,
      is_leaf=plan.is_leaf_like,
    )
    return plan.unpack(g_new, updates), new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
