"""A chain traced once per group of equal leaves, as `_grouping.plan` says.

A chain's elementwise steps are written out once per leaf (~230 StableHLO
lines a LLaMA layer); `group_leaves` stacks each group on a new axis, runs
the chain once and slices the results back (on a mesh, joined along an axis
the shardings leave whole: no op per member in); the state keeps `init`'s
per-leaf layout. It calls a chain, so it sits with the transformations (an
update's calls go back up the layers only into the method's step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import keystr

from htmuon_jax import _layouts as dn
from htmuon_jax import _grouping as grouping
from htmuon_jax import sharding as sharding_lib


# `build(dims, mask)`: the chain for a tree, from a dimension-number
# callable (or None: no matrices) and a weight decay mask (or None).
Build = Callable[
  [Optional[Callable[[Any], Any]], Any], optax.GradientTransformation
]


def _free_axis(x: Any, spec: Any = None) -> Optional[int]:
  """The first axis of leaf `x` that its sharding leaves whole: its type's
  (explicit axes), else `spec` (stated), else 0 on one device and None on
  several (every axis may be split)."""
  abstract = isinstance(x, jax.ShapeDtypeStruct)
  sharding = x.sharding if abstract else grouping.sharding_key(x)
  spec = spec if sharding is None else sharding.spec
  if spec is None or len(spec) > len(x.shape):
    return 0 if x.shape and jax.device_count() == 1 else None
  spec = tuple(spec) + (None,) * (len(x.shape) - len(spec))
  return next((i for i, s in enumerate(spec) if s is None), None)


def _join(xs: Sequence[jax.Array], like: Any, spec: Any = None) -> jax.Array:
  """Members' leaves as one group leaf shaped like `like`: the parameter's
  layout (sharded as `spec` states, if known) on a new axis, per-matrix
  state along its batch axis."""
  k, shape = len(xs), xs[0].shape
  if like.shape == (k,) + shape:
    a = _free_axis(xs[0], spec)
    if a is None:  # a new axis: one broadcast per member
      return jnp.stack(xs)
    # Joined along a whole axis and split there: no op per member, and no
    # device's shard moves (joining a split axis would).
    joined = jnp.concatenate(xs, axis=a)
    stacked = joined.reshape(shape[:a] + (k, shape[a]) + shape[a + 1 :])
    return jnp.moveaxis(stacked, a, 0)
  if shape and like.shape == (k * shape[0],) + shape[1:]:
    return grouping.concat(xs)
  raise ValueError(
    f"group_leaves: cannot join state leaves of shape {shape} into "
    f"{like.shape}."
  )


def _split(y: jax.Array, likes: Sequence[Any], spec: Any = None) -> list:
  """The members' leaves (shaped like `likes`, with their shardings) of a
  group leaf `y`: `_join` undone."""
  k, shape = len(likes), likes[0].shape
  if y.shape == (k,) + shape:
    a = _free_axis(likes[0], spec)
    if a is None:
      return [y[i] for i in range(k)]
    y = jnp.moveaxis(y, 0, a).reshape(
      shape[:a] + (k * shape[a],) + shape[a + 1 :]
    )
    n = shape[a]
    return [
      jax.lax.slice_in_dim(y, i * n, (i + 1) * n, axis=a) for i in range(k)
    ]
  return grouping.split(y.reshape((-1,) + shape[1:]), [shape[0]] * k)


def _pack(slots: list, groups: Any, specs: list, like: Any = None) -> tuple:
  """Per-leaf slots as a group tree (a tuple, one entry a group), shaped like
  `like` (default: stacked on a new axis); `specs`: per leaf, its stated
  `PartitionSpec` or None."""
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
      spec = specs[members[0]]
      parts = [
        jax.tree.map(lambda r, *xs, s=spec: _join(xs, r, s), ref, *parts)
      ]
    out.append(parts[0])
  return tuple(out)


def _unpack(y: tuple, groups: Any, slots: list, specs: list) -> list:
  """Group tree `y` back to per-leaf slots laid out like `slots`."""
  slots = list(slots)
  for members, part in zip(groups, y):
    refs = [jax.tree.leaves(slots[i]) for i in members]
    leaves, treedef = jax.tree.flatten(part)
    pieces = [
      _split(x, [r[j] for r in refs], specs[members[0]])
      if len(members) > 1
      else [x]
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
  per matrix. The groups follow `execution` (`grouping`, `memory_budget`)
  as `_grouping.plan` decides. State and updates equal the chain's own, to
  float round-off (a grouped sum may run in another order).
  """
  # Built once, at construction (bad hyperparameters raise now).
  inner = optax.with_extra_args_support(build(leaf_dims, mask))
  stated = dict(execution.shardings or ())  # path -> stated sharding

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
    # Each leaf's spec: its type's (explicit axes), else the stated one.
    paths = [keystr(p) for p, _ in jax.tree.leaves_with_path(updates)]
    missing = [p for p in paths if stated and p not in stated]
    if missing:
      raise ValueError(
        f"shardings: no sharding stated for the leaf at {missing[0]}; "
        "Execution.shardings needs a tree like the params."
      )
    if execution.distribute and jax.device_count() > 1 and None in shardings:
      # Automatic axes: grouped before `distribute`'s all-to-all, GSPMD
      # moved the stacks early (+194 MiB of collective-permutes, 768 tree).
      return inner.update(updates, state, params, **extra_args)
    specs = [
      stated.get(path) if k is None else k.spec
      for k, path in zip(shardings, paths)
    ]
    plan = grouping.plan(
      leaves, execution, dims=dims, flags=flags, shardings=specs
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

    pack = lambda x, like=None: _pack(up_to(x), groups, specs, like)

    def unpack(y: Any, like: Any) -> Any:
      # Abstract, with the shardings `_split` reads.
      likes = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
          a.shape, a.dtype, sharding=grouping.sharding_key(a)
        ),
        like,
      )
      fn = lambda y: jax.tree.unflatten(
        treedef, _unpack(y, groups, up_to(likes), specs)
      )
      keys = [grouping.sharding_key(a) for a in jax.tree.leaves(like)]
      if not keys or None in keys:
        return fn(y)
      # Explicit shardings: split in an auto-axes region, without a sharding
      # constraint after each slice (a shorter program).
      out = jax.tree.map(lambda a: jax.typeof(a).sharding, like)
      return jax.sharding.auto_axes(fn, out_sharding=out)(y)

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
    g_new, g_new_state = grouped.update(
      g_updates, g_state, g_params, **extra_args
    )
    if jax.device_count() > 1 and None in shardings:
      # Automatic axes: joined updates and state leave as they came in (left
      # to GSPMD, their slices back were moved by all-to-all).
      g_new = jax.tree.map(grouping.sharded_alike, g_new, g_updates)
      g_new_state = jax.tree.map(grouping.sharded_alike, g_new_state, g_state)
    g_state = g_new_state
    new_state = jax.tree.map(
      lambda x, y: unpack(y, x) if leaf_like(x) else y,
      state,
      g_state,
      is_leaf=leaf_like,
    )
    return unpack(g_new, updates), new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
