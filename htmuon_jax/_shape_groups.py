"""A chain traced once per group of equal leaves, as `_grouping.plan` says.

A chain's elementwise steps are written out once per leaf (~230 StableHLO
lines a LLaMA layer); `group_leaves` stacks each group on a new axis, runs
the chain once and slices the results back; the state keeps `init`'s
per-leaf layout. It calls a chain, so it sits with the transformations (an
update's calls go back up the layers only into the method's step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from htmuon_jax import _layouts as dn
from htmuon_jax import _grouping as grouping
from htmuon_jax import sharding as sharding_lib


# `build(dims, mask)`: the chain for a tree, from a dimension-number
# callable (or None: no matrices) and a weight decay mask (or None).
Build = Callable[
  [Optional[Callable[[Any], Any]], Any], optax.GradientTransformation
]


def _join(xs: Sequence[jax.Array], like: Any) -> jax.Array:
  """Members' leaves as one group leaf shaped like `like`: the parameter's
  layout on a new axis, per-matrix state along its batch axis."""
  k, shape = len(xs), xs[0].shape
  if like.shape == (k,) + shape:
    # Explicit shardings: a new unsharded axis (a reshape would split one).
    if not shape or grouping.sharding_key(xs[0]) is not None:
      return jnp.stack(xs)
    return grouping.concat(xs).reshape(like.shape)
  if shape and like.shape == (k * shape[0],) + shape[1:]:
    return grouping.concat(xs)
  raise ValueError(
    f"group_leaves: cannot join state leaves of shape {shape} into "
    f"{like.shape}."
  )


def _split(y: jax.Array, likes: Sequence[Any], explicit: bool) -> list:
  """The members' leaves (shaped like `likes`) of a group leaf `y`."""
  k, shape = len(likes), likes[0].shape
  explicit = explicit or grouping.sharding_key(y) is not None
  if y.shape == (k,) + shape and (not shape or explicit):
    return [y[i] for i in range(k)]
  return grouping.split(y.reshape((-1,) + shape[1:]), [shape[0]] * k)


def _pack(slots: list[Any], groups: Any, like: Any = None) -> tuple:
  """Per-leaf slots as a group tree (a tuple, one entry a group), shaped like
  `like` (default: stacked on a new axis)."""
  out = []
  for g, members in enumerate(groups):
    parts = [slots[i] for i in members]
    k = len(parts)
    if k > 1:
      ref = (
        like[g]
        if like is not None
        else jax.tree.map(
          lambda a, k=k: jax.ShapeDtypeStruct((k,) + a.shape, a.dtype), parts[0]
        )
      )
      parts = [jax.tree.map(lambda r, *xs: _join(xs, r), ref, *parts)]
    out.append(parts[0])
  return tuple(out)


def _unpack(y: tuple, groups: Any, slots: list, explicit: bool) -> list:
  """Group tree `y` back to per-leaf slots laid out like `slots`."""
  slots = list(slots)
  for members, part in zip(groups, y):
    refs = [jax.tree.leaves(slots[i]) for i in members]
    leaves, treedef = jax.tree.flatten(part)
    pieces = [
      _split(x, [r[j] for r in refs], explicit) if len(members) > 1 else [x]
      for j, x in enumerate(leaves)
    ]
    for m, i in enumerate(members):
      slots[i] = jax.tree.unflatten(treedef, [p[m] for p in pieces])
  return slots


def group_leaves(
  build: Build,
  leaf_dims: Optional[Callable[[Any], Any]] = None,
  mask: Any = None,
  *,
  execution: sharding_lib.Execution = sharding_lib.DEFAULT_EXECUTION,
) -> optax.GradientTransformationExtraArgs:
  """`build(leaf_dims, mask)`, traced once per group of equal leaves.

  `build` makes the chain for a tree from a dimension-number callable
  (None when `leaf_dims` is: no matrices) and a decay mask (None when
  `mask`, a tree or callable of bools, is). The chain must treat leaves
  independently given these two and keep its state in the tree's layout or
  per matrix. The groups follow `execution` (`grouping`, `memory_budget`;
  one device only). State and updates equal the chain's own, to float
  round-off (a grouped sum may run in another order).
  """
  # Built once, at construction (bad hyperparameters raise now).
  inner = optax.with_extra_args_support(build(leaf_dims, mask))

  def update_fn(
    updates: Any, state: Any, params: Any = None, **extra_args: Any
  ) -> tuple[Any, Any]:
    leaves, treedef = jax.tree.flatten(updates)
    # PyTreeDef's stubs lack flatten_up_to.
    up_to = treedef.flatten_up_to  # type: ignore[attr-defined]
    dims = [None] * len(leaves)
    if leaf_dims is not None:
      dims = up_to(dn.resolve_dimension_numbers(leaf_dims, updates))
    flags = None
    if mask is not None:
      tree = mask(updates) if callable(mask) else mask
      tree = jax.tree.map(
        lambda m, u: jax.tree.map(lambda _: m, u), tree, updates
      )
      flags = [bool(m) for m in up_to(tree)]
    shardings = [grouping.sharding_key(x) for x in leaves]
    plan = grouping.plan(
      leaves, execution, dims=dims, flags=flags, shardings=shardings
    )
    if all(len(m) == 1 for m in plan.groups):
      return inner.update(updates, state, params, **extra_args)
    groups = plan.groups

    def leaf_like(x: Any) -> bool:  # a subtree with a slot per leaf
      try:
        up_to(x)
      except (ValueError, TypeError):
        return False
      return True

    pack = lambda x, like=None: _pack(up_to(x), groups, like)

    def unpack(y: Any, like: Any) -> Any:
      shapes = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like
      )
      fn = lambda y, e: jax.tree.unflatten(
        treedef, _unpack(y, groups, up_to(shapes), e)
      )
      keys = [grouping.sharding_key(a) for a in jax.tree.leaves(like)]
      if not keys or None in keys:
        return fn(y, False)
      # Explicit shardings: split in an auto-axes region, without a sharding
      # constraint after each slice and reshape (a shorter program).
      out = jax.tree.map(lambda a: jax.typeof(a).sharding, like)
      return jax.sharding.auto_axes(lambda y: fn(y, True), out_sharding=out)(y)

    group_dims = tuple(
      grouping.shifted(dims[m[0]], leaves[m[0]].ndim)
      if len(m) > 1 and dims[m[0]] is not None
      else dims[m[0]]
      for m in plan.groups
    )
    masks = None if flags is None else tuple(flags[m[0]] for m in plan.groups)
    grouped = optax.with_extra_args_support(
      build(None if leaf_dims is None else (lambda _: group_dims), masks)
    )
    g_updates = pack(updates)
    g_params = None if params is None else pack(params)
    abstract = jax.eval_shape(
      grouped.init, g_updates if g_params is None else g_params
    )
    g_state = jax.tree.map(
      lambda x, a: pack(x, a) if leaf_like(x) else x,
      state,
      abstract,
      is_leaf=leaf_like,
    )
    g_new, g_state = grouped.update(g_updates, g_state, g_params, **extra_args)
    new_state = jax.tree.map(
      lambda x, y: unpack(y, x) if leaf_like(x) else y,
      state,
      g_state,
      is_leaf=leaf_like,
    )
    return unpack(g_new, updates), new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
