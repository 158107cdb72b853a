"""The one grouping plan: which leaves share a traced step, in what chunks, where.

A program traced once per leaf grows with the number of layers. `plan`
decides which items run as one group (equal structure, shapes, dtypes,
layout, decay flag; tall matrices joining their wide transposes), which stay
alone (a stack over one memory chunk: joining would copy it), the `lax.map`
chunks, and the placement: per leaf, grouped, or spread whole over a mesh
(one all-to-all in and one out per group). The per-matrix step
(`update_per_matrix`) and the chain (`_shape_groups.group_leaves`) both use
it, with the optimizer's `Execution`. Under GSPMD joining differently
sharded leaves makes XLA reshard them, so on several devices leaves group
only with equal shardings where explicit mesh axes show them, or where the
user says they share one (`grouping="shapes"`). On CPU a grouped step
measured 10-35% slower (2 cores): "auto" groups on accelerators only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

from htmuon_jax import _layouts as dn
from htmuon_jax.sharding._distribute import with_auto_axes
from htmuon_jax.sharding._distribute import DEFAULT_EXECUTION
from htmuon_jax.sharding._distribute import Execution
from htmuon_jax.sharding._distribute import ExecutionLike
from htmuon_jax.sharding._distribute import as_execution
from htmuon_jax.sharding._distribute import mesh_and_axes


LEAF, GROUPED, MESH = "leaf", "grouped", "mesh"  # where groups run
# Live buffers of one matrix's step (iterates, Gram matrices), in units of
# its size: the working-set estimate behind the chunk size.
_LIVE_BUFFERS = 10


def resolved_grouping(grouping: str, explicit: bool = False) -> str:
  """`grouping` with "auto" resolved for this run (when traced): on
  several accelerator devices, "shapes" where shardings are `explicit`."""
  if grouping != "auto":
    return grouping
  accelerator = jax.default_backend() != "cpu"
  if accelerator and jax.device_count() == 1:
    return "transposes"
  return "shapes" if accelerator and explicit else "off"


def sharding_key(x: Any) -> Any:
  """`x`'s sharding where its type shows it (explicit mesh axes), else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return None
  return sharding if AxisType.Explicit in mesh.axis_types else None


def _batch(item: Any) -> int:
  return jax.tree.leaves(item)[0].shape[0]


def entry_bytes(item: Any) -> int:
  """Estimated working set of one batch entry of `item` (bytes)."""
  return _LIVE_BUFFERS * sum(
    math.prod(x.shape[1:]) * max(np.dtype(x.dtype).itemsize, 4)
    for x in jax.tree.leaves(item)
  )


def chunk_size(n: int, entry: int, budget: Optional[int]) -> int:
  """Largest divisor of `n` whose chunk fits `budget` (at least 1)."""
  if budget is None or n * entry <= budget:
    return n
  limit = max(1, budget // max(entry, 1))
  return max(k for k in range(1, min(n, limit) + 1) if n % k == 0)


class Plan(NamedTuple):
  """Groups of items (indices, first seen first) and where they run."""

  placement: str  # LEAF, GROUPED or MESH
  groups: tuple[tuple[int, ...], ...]
  flipped: tuple[bool, ...]  # per item: transposed to join its wide twins
  budget: Optional[int]  # bytes per lax.map chunk

  def map(self, fn: Callable[..., Any], x: Any, *args: Any) -> Any:
    """`fn(x, *args)` for a batched per-entry `fn`, in chunks under budget."""
    n = _batch(x)
    k = chunk_size(n, entry_bytes(x), self.budget)
    if k == n:
      return fn(x, *args)
    chunks = jax.tree.map(lambda a: a.reshape((n // k, k) + a.shape[1:]), x)
    out = jax.lax.map(lambda c: fn(c, *args), chunks)
    return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)

  def flip(self, items: Sequence[Any]) -> list[Any]:
    """Flipped items transposed (on the way in, and back on the way out)."""
    return [
      jnp.swapaxes(x, 1, 2) if f else x for x, f in zip(items, self.flipped)
    ]


def shifted(d: MuonDimensionNumbers, ndim: int) -> MuonDimensionNumbers:
  """`d` for the leaf stacked on a new leading axis (normalized axes)."""
  axes = lambda a: tuple(
    x % ndim + 1 for x in ((a,) if isinstance(a, int) else a)
  )
  return MuonDimensionNumbers(axes(d.reduction_axis), axes(d.output_axis))


def plan(
  items: Sequence[Any],
  execution: Execution,
  *,
  transposes: bool = False,
  dims: Optional[Sequence[Any]] = None,
  flags: Optional[Sequence[Any]] = None,
  shardings: Optional[Sequence[Any]] = None,
) -> Plan:
  """Decides the groups of `items`, their chunks and their placement.

  `items` are pytrees of arrays joined along a leading batch axis, or with
  `dims` (the chain level) leaves joined on a new axis, keyed also by their
  layout (dimension numbers, or None) and decay `flags`. With `transposes`
  (`(B, m, n)` arrays, `fn(x^T) = fn(x)^T`) tall ones join their wide
  transposes, on a mesh or with `grouping="transposes"`. The chain level
  ignores `distribute`; on several devices it groups where every item's
  sharding is explicit (`shardings`, of `sharding_key`: equal shardings
  only, untransposed) or where `grouping="shapes"` states that equal leaves
  share one.
  """
  n, budget, stacked = len(items), execution.memory_budget, dims is not None
  explicit = bool(shardings) and None not in shardings  # type: ignore[operator]
  mode = resolved_grouping(execution.grouping, explicit)
  placement = GROUPED
  if execution.distribute is not None and not stacked:
    placement, shardings = MESH, None  # it moves the matrices anyway
  elif mode == "off" or (
    # Automatic axes: the chain groups where the user says equal leaves
    # share a sharding.
    stacked and jax.device_count() > 1 and not explicit and mode != "shapes"
  ):
    return Plan(LEAF, tuple((i,) for i in range(n)), (False,) * n, budget)
  transposes = transposes and (placement == MESH or mode == "transposes")
  transposes = transposes and not (explicit and placement == GROUPED)
  keyed: dict[Any, list[int]] = {}
  flipped = []
  for i, item in enumerate(items):
    d = None if dims is None else dims[i]
    stack = item  # the chain level: the leaf's matrix stack, if any
    if stacked:
      stack = d and jax.ShapeDtypeStruct(
        matrix_shape(item.shape, d), item.dtype
      )
    b = 0 if stack is None else _batch(stack)
    # Several matrices over one chunk are already one traced loop; joining
    # copied them (XLA's temporaries doubled on a stacked LLaMA-1B).
    alone = bool(
      placement == GROUPED
      and budget is not None
      and b > 1
      and b * entry_bytes(stack) > budget
    )
    if transposes and placement == MESH and getattr(item, "ndim", 0) != 3:
      raise ValueError("grouped_map: transposes need (B, m, n) arrays.")
    flip = transposes and not alone and getattr(item, "ndim", 0) == 3
    flip = flip and item.shape[1] > item.shape[2]
    if flip:  # keyed as its wide transpose
      s0, s1, s2 = item.shape
      item = jax.ShapeDtypeStruct((s0, s2, s1), item.dtype)
    leaves, treedef = jax.tree.flatten(item)
    shapes = tuple((x.shape[int(not stacked) :], x.dtype) for x in leaves)
    layout = d and shifted(d, item.ndim)
    key = (
      treedef,
      shapes,
      layout,
      flags and flags[i],
      shardings and shardings[i],
    )
    keyed.setdefault(("alone", i) if alone else key, []).append(i)
    flipped.append(flip)
  groups = tuple(tuple(m) for m in keyed.values())
  return Plan(placement, groups, tuple(flipped), budget)


def concat(parts: Sequence[Any]) -> Any:
  """Pytrees joined along their leading axis."""
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


def split(out: Any, sizes: Sequence[int]) -> list[Any]:
  """`concat`'s parts back, of leading sizes `sizes`."""
  if len(sizes) == 1:
    return [out]
  bounds = np.cumsum([0, *sizes])
  return [
    jax.tree.map(lambda y, lo=lo, hi=hi: y[lo:hi], out)
    for lo, hi in zip(bounds[:-1], bounds[1:])
  ]


def _on_mesh(
  p: Plan,
  fn: Callable[..., Any],
  items: list[Any],
  args: Sequence[Any],
  execution: Execution,
) -> list[Any]:
  """Each group spread whole over the mesh, `fn` local in a `shard_map`."""
  mesh, axes = mesh_and_axes(execution.distribute)
  n_dev = math.prod(mesh.shape[a] for a in axes)
  spec = P(axes)
  results: list[Any] = [None] * len(items)
  for members in p.groups:
    # A member whose batch is a multiple of the device count gives each
    # device an equal chunk in place (state split along its batch axis
    # does not move); the rest are joined and padded with zeros.
    aligned = [i for i in members if _batch(items[i]) % n_dev == 0]
    rest = [i for i in members if _batch(items[i]) % n_dev]
    total = sum(_batch(items[i]) for i in rest)
    pad = -total % n_dev
    inputs = [items[i] for i in aligned]
    if rest:
      zeros = jax.tree.map(
        lambda x, k=pad: jnp.zeros((k,) + x.shape[1:], x.dtype),
        items[rest[0]],
      )
      inputs.append(concat([items[i] for i in rest] + ([zeros] if pad else [])))
    splits = [_batch(x) // n_dev for x in inputs]
    step = lambda x, *a: p.map(fn, x, *a)
    if not aligned:
      step = _skip_padding(step, total, pad, sum(splits), axes)

    def on_device(
      parts: list[Any], *a: Any, splits=splits, step=step
    ) -> list[Any]:
      return split(step(concat(parts), *a), splits)

    local = jax.shard_map(
      on_device,
      mesh=mesh,
      in_specs=([spec] * len(inputs),) + (P(),) * len(args),
      out_specs=[spec] * len(inputs),
      check_vma=False,
    )
    outs = local([_staged(x, mesh, axes) for x in inputs], *args)
    outs = [
      _staged(
        x, mesh, axes, back=True, joined=bool(rest) and k == len(outs) - 1
      )
      for k, x in enumerate(outs)
    ]
    for i, out in zip(aligned, outs):
      results[i] = out
    if rest:
      sizes = [_batch(items[i]) for i in rest] + [pad]
      for i, out in zip(rest, split(outs[-1], sizes)):
        results[i] = out
  return results


def _skip_padding(
  fn: Callable[..., Any], total: int, pad: int, per_device: int, axes: Any
) -> Callable[..., Any]:
  """`fn`, skipped on devices whose share is all padding (zeros out): CPU
  devices sharing a host's cores save the work."""
  if pad < per_device:  # every device holds at least one real matrix
    return fn

  def local(x: Any, *args: Any) -> Any:
    start = jax.lax.axis_index(axes) * per_device
    zeros = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, x, *args)
    )
    return jax.lax.cond(start < total, lambda: fn(x, *args), lambda: zeros)

  return local


def _staged(
  item: Any,
  mesh: Any,
  axes: tuple[str, ...],
  *,
  back: bool = False,
  joined: bool = False,
) -> Any:
  """`item`'s batch axis moved onto (or, `back`, off) the mesh axes.

  The matrix stack (the item's first leaf, laid out like its parameter)
  moves one mesh axis at a time: several at once, the partitioner
  replicates the group instead. Per-matrix state (the other leaves, split
  over all the axes on one of its own axes, as `spread_spec` stores it)
  moves in one all-to-all; staged, it was replicated and split again on a
  two-axis mesh ("Involuntary full rematerialization"). Back, a `joined`
  group's state first spreads over its rows (one all-to-all), so that the
  members sliced out of it are not each on one device.
  """
  leaves, treedef = jax.tree.flatten(item)
  spec = lambda s: NamedSharding(mesh, s) if isinstance(mesh, Mesh) else s
  stages = [P(axes[:k]) for k in range(1, len(axes))]
  x = leaves[0]
  for s in stages[::-1] if back else stages:
    x = jax.lax.with_sharding_constraint(x, spec(s))
  n = math.prod(mesh.shape[a] for a in axes)

  def place(y: Any) -> Any:
    if not back:
      return jax.lax.with_sharding_constraint(y, spec(P(axes)))
    free = [i for i in range(1, y.ndim) if y.shape[i] % n == 0]
    if not joined or not free:
      return y
    to = P(*([None] * free[0] + [axes]))
    return jax.lax.with_sharding_constraint(y, spec(to))

  return jax.tree.unflatten(treedef, [x, *map(place, leaves[1:])])


def sharded_alike(new: Any, old: Any) -> Any:
  """`new` sharded like `old` where both are arrays of one shape and dtype."""
  same = isinstance(new, jax.Array) and isinstance(old, jax.Array)
  if same and new.shape == old.shape and new.dtype == old.dtype:
    return shard_alike(new, old)[0]
  return new


def bind_static_args(
  fn: Callable[..., Any], args: Sequence[Any]
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """`(bound, traced)`, `bound(x, *traced) == fn(x, *args)`: traced args
  enter `shard_map` and auto-axes regions as arguments, concrete ones stay
  static (`power == 0` must, for Newton-Schulz)."""
  args = tuple(args)
  is_traced = [isinstance(a, jax.core.Tracer) for a in args]

  def bound(x: Any, *traced: Any) -> Any:
    it = iter(traced)
    return fn(x, *[next(it) if t else a for a, t in zip(args, is_traced)])

  return bound, tuple(a for a, t in zip(args, is_traced) if t)


def grouped_map(
  fn: Callable[..., Any],
  items: Sequence[Any],
  distribute: ExecutionLike,
  *,
  args: Sequence[Any] = (),
  transpose_equivariant: bool = False,
  shardings: Optional[Sequence[Any]] = None,
) -> list[Any]:
  """`[fn(item, *args) for item in items]`, one traced `fn` per planned group.

  Items are pytrees of arrays with a leading batch axis (a `(B, m, n)`
  stack, or it and its per-matrix state); `fn` acts on each batch entry
  independently and accepts zeros (padding). With a mesh in `distribute`
  (as `as_distribute`, or an `Execution`) each group is spread whole over
  its devices in a `jax.shard_map`: a member whose batch divides evenly in
  place, the others joined and padded. Traced `args` go here, not in a
  closure (`shard_map` cannot close over them). With
  `transpose_equivariant` (`fn(x^T) = fn(x)^T`) tall matrices join their
  wide transposes. `shardings`: per item, its `sharding_key` (see `plan`).
  """
  execution = as_execution(distribute)
  p = plan(
    items, execution, transposes=transpose_equivariant, shardings=shardings
  )
  items = p.flip(items)
  if p.placement == MESH:
    return p.flip(_on_mesh(p, fn, items, args, execution))
  results: list[Any] = [None] * len(items)
  unknown = jax.device_count() > 1 and not (shardings and None not in shardings)
  for members in p.groups:
    parts = [items[i] for i in members]
    joined = concat(parts)
    out = p.map(fn, joined, *args)
    if unknown and len(parts) > 1:
      # Automatic axes: the group leaves laid out as it came in (else GSPMD
      # may pick another layout, and the slices back move it).
      out = jax.tree.map(sharded_alike, out, joined)
    for i, r in zip(members, split(out, [_batch(x) for x in parts])):
      results[i] = r
  return p.flip(results)


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
  """`init_leaf(matrix_shape)` for matrix leaves, `MaskedNode()` for others
  (its type declares the field with `sharding.per_matrix_state`)."""
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
  execution: Execution = DEFAULT_EXECUTION,
  args: Sequence[Any] = (),
  *,
  transpose_equivariant: bool = False,
) -> tuple[Any, Any]:
  """Maps `fn` over the matrix leaves: the package's one per-matrix executor.

  Each matrix leaf becomes its `(batch, fan_in, fan_out)` stack and runs
  with its state leaf (a tree made by `init_per_matrix`, or `state=None`:
  stateless) as `plan` says; with `execution.distribute` each result gets
  its input's sharding back. Under explicit mesh axes it runs in an
  auto-axes region. `fn(matrices, state_leaf, *args) -> (new, new_state)`
  (stateless: `fn(matrices, *args) -> new`) acts on each batch entry alone,
  accepts zeros (padding) and may return any float dtype. Traced `args`
  (an injected `power`) enter the regions as arguments. Returns
  `(new_updates, new_state)`; non-matrix leaves pass through.
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
  item_fn = fn if stateless else (lambda item, *a: fn(item[0], item[1], *a))
  call, traced = bind_static_args(item_fn, args)
  spread = execution.distribute is not None
  # Read outside the auto-axes region, where the types still show them.
  keys = [sharding_key(leaves[i]) for i in idx]
  if not stateless:
    keys = [
      None
      if k is None
      else (k, tuple(map(sharding_key, jax.tree.leaves(states[i]))))
      for k, i in zip(keys, idx)
    ]

  def run(xs: tuple[list, list], *a: Any) -> tuple[list, list]:
    us, ss = xs
    ds = [dims[i] for i in idx]
    mats = [dn.to_matrices(u, d) for u, d in zip(us, ds)]
    items = mats if stateless else list(zip(mats, ss))
    results = grouped_map(
      call,
      items,
      execution,
      args=a,
      transpose_equivariant=transpose_equivariant,
      shardings=keys,
    )
    if stateless:
      results = [(r, None) for r in results]
    new_us, new_ss = [], []
    for (out, new_s), d, u, s in zip(results, ds, us, ss):
      out = dn.from_matrices(out.astype(u.dtype), d, u.shape)
      if spread:  # back to the input's layout, not GSPMD's choice
        out = shard_alike(out, u)[0]
        new_s = jax.tree.map(lambda n, o: shard_alike(n, o)[0], new_s, s)
      new_us.append(out)
      new_ss.append(new_s)
    return new_us, new_ss

  new_us, new_ss = with_auto_axes(
    run, ([leaves[i] for i in idx], [states[i] for i in idx]), *traced
  )
  for i, u, s in zip(idx, new_us, new_ss):
    leaves[i], states[i] = u, s
  new_state = None if stateless else jax.tree.unflatten(treedef, states)
  return jax.tree.unflatten(treedef, leaves), new_state
