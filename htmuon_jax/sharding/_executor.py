"""The distributed spectral step: whole matrices per device (`grouped_map`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from htmuon_jax import _batching as batching
from htmuon_jax.sharding._distribute import ExecutionLike
from htmuon_jax.sharding._distribute import as_execution
from htmuon_jax.sharding._distribute import mesh_and_axes


def bind_static_args(
  fn: Callable[..., Any], args: Sequence[Any]
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """Binds the concrete arguments of `fn(x, *args)`; the traced ones remain.

  Traced hyperparameters (e.g. an injected `power`) must enter `shard_map`
  and auto-axes regions as arguments, not through a closure; concrete ones
  must stay Python values (e.g. `power == 0` must stay static for
  Newton-Schulz).

  Args:
    fn: `fn(x, *args)`.
    args: its extra arguments, traced or not.

  Returns:
    `(bound, traced)`: the traced members of `args`, in order, and `bound`
    with `bound(x, *traced) == fn(x, *args)`.
  """
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
) -> list[Any]:
  """Maps a batched per-matrix function over items, whole matrices per device.

  Each item is a pytree of arrays sharing a leading batch axis (e.g. a
  `(B, fan_in, fan_out)` stack of matrices, or a tuple of it and per-matrix
  state with the same leading axis). Items whose leaves have equal shapes
  (after the batch axis) and dtypes form one group, and `fn` runs once per
  device on the device's share of the group in a `jax.shard_map`: an item
  whose batch is a multiple of the number of devices on the `distribute`
  axes gives each device an equal, contiguous chunk of it (where an array
  split along its batch axis over those axes already lies: it does not
  move), the other items are concatenated and padded with zeros to a
  multiple of the device count. `fn` must act on each batch entry
  independently (a batched per-matrix function), so the result equals
  `fn(item)` for each item.

  Args:
    fn: `fn(x, *args)` maps a pytree `x` of `(b, ...)` arrays (the structure
      of an item) to a pytree of `(b, ...)` arrays. It runs on the padding
      too, so it must accept all-zero inputs (the package's rule: zero in,
      zero out).
    items: the items to map over.
    distribute: where to run (see `as_distribute`), or an `Execution`
      (its `distribute`, and its `memory_budget` for each device's chunks).
      `None` calls `fn` on each item directly (no grouping).
    args: extra arguments of `fn`, replicated to every device: pass traced
      hyperparameters (e.g. an injected `power`) here rather than closing
      over them, as `shard_map` cannot close over values on explicit axes.
    transpose_equivariant: if True, each item must be a single
      `(B, m, n)` array and `fn(x^T) = fn(x)^T` must hold (true of the
      spectral power and of Newton-Schulz), so tall matrices are transposed
      to join the group of their wide transposes (fewer, fuller groups).

  Returns:
    The list of `fn(item)` results, in the order of `items`.
  """
  execution = as_execution(distribute)
  d = execution.distribute
  if d is None:
    return [fn(item, *args) for item in items]
  mesh, axes = mesh_and_axes(d)
  n_dev = math.prod(mesh.shape[a] for a in axes)
  spec = P(axes)

  flipped = [False] * len(items)
  items = list(items)
  if transpose_equivariant:
    for i, x in enumerate(items):
      if not isinstance(x, jax.Array) or x.ndim != 3:
        raise ValueError(
          "grouped_map: transpose_equivariant=True needs (B, m, n) arrays."
        )
      if x.shape[1] > x.shape[2]:
        items[i], flipped[i] = jnp.swapaxes(x, 1, 2), True

  groups: dict[Any, list[int]] = {}
  for i, item in enumerate(items):
    groups.setdefault(batching.group_key(item), []).append(i)

  results: list[Any] = [None] * len(items)
  for members in groups.values():
    sizes = [jax.tree.leaves(items[i])[0].shape[0] for i in members]
    # Members whose batch is a multiple of the device count ("aligned", e.g.
    # stacked layers) give each device an equal chunk of their own, in place:
    # state stored split along its batch axis (see `state_shardings`) does
    # not move. The others are concatenated and padded with zeros.
    aligned = [j for j, b in enumerate(sizes) if b % n_dev == 0]
    rest = [j for j, b in enumerate(sizes) if b % n_dev]
    rest_total = sum(sizes[j] for j in rest)
    pad = -rest_total % n_dev
    rest_chunk = (rest_total + pad) // n_dev
    chunks = [sizes[j] // n_dev for j in aligned]
    per_device = sum(chunks) + rest_chunk

    def pad_rest(*leaves: jax.Array, pad: int = pad) -> jax.Array:
      parts = list(leaves)
      if pad:
        parts.append(jnp.zeros((pad,) + leaves[0].shape[1:], leaves[0].dtype))
      return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    inputs = [items[members[j]] for j in aligned]
    if rest:
      inputs.append(jax.tree.map(pad_rest, *[items[members[j]] for j in rest]))
    splits = chunks + ([rest_chunk] if rest else [])
    # Each device runs its share in memory-bounded chunks (one program).
    chunked = lambda x, *a: batching.map_in_chunks(
      fn, x, *a, budget=execution.memory_budget
    )
    skip = (
      _skip_padding(chunked, rest_total, pad, per_device, axes)
      if not aligned
      else chunked
    )

    def on_device(
      parts: list[Any],
      *a: Any,
      splits: list = splits,
      skip: Callable[..., Any] = skip,
    ) -> list[Any]:
      # This device's chunk of every input, as one local batch.
      joined = jax.tree.map(
        lambda *xs: jnp.concatenate(xs, axis=0) if len(xs) > 1 else xs[0],
        *parts,
      )
      out = skip(joined, *a)
      bounds = np.cumsum([0] + splits)
      return [
        jax.tree.map(lambda y, lo=lo, hi=hi: y[lo:hi], out)
        for lo, hi in zip(bounds[:-1], bounds[1:])
      ]

    local = jax.shard_map(
      on_device,
      mesh=mesh,
      in_specs=([spec] * len(inputs),) + (P(),) * len(args),
      out_specs=[spec] * len(inputs),
      check_vma=False,
    )
    outs = local(_staged(inputs, mesh, axes), *args)
    outs = _staged(outs, mesh, axes, back=True)
    for j, out in zip(aligned, outs):
      results[members[j]] = out
    if rest:
      offsets = np.cumsum([0] + [sizes[j] for j in rest])
      for j, start, stop in zip(rest, offsets[:-1], offsets[1:]):
        results[members[j]] = jax.tree.map(
          lambda y, a=start, b=stop: y[a:b], outs[-1]
        )
  return [jnp.swapaxes(r, 1, 2) if f else r for r, f in zip(results, flipped)]


def _skip_padding(
  fn: Callable[..., Any],
  total: int,
  pad: int,
  per_device: int,
  axes: tuple[str, ...],
) -> Callable[..., Any]:
  """`fn`, skipped on devices whose whole slice is padding.

  A group smaller than the device count (e.g. the embedding and the LM head)
  leaves some devices with zero matrices only; they return zeros without
  computing. Wall time is the busiest device's either way, but devices that
  share a host's cores (CPU devices) save the work.
  """
  if pad < per_device:  # Every device holds at least one real matrix.
    return fn

  def local(x: Any, *args: Any) -> Any:
    start = jax.lax.axis_index(axes) * per_device
    zeros = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, x, *args)
    )
    return jax.lax.cond(start < total, lambda: fn(x, *args), lambda: zeros)

  return local


def _staged(
  tree: Any, mesh: Any, axes: tuple[str, ...], *, back: bool = False
) -> Any:
  """Moves the batch axis's sharding one mesh axis at a time.

  The partitioner cannot move several mesh axes from different dimensions
  onto the batch axis in one go (it replicates the whole group instead), but
  one at a time works: `P(a0)`, `P((a0, a1))`, ... up to `P(axes)` (the
  shard_map's own layout), in reverse order on the way back. Each stage is an
  all-to-all, an all-gather of a replicated axis, or a local slice.
  """
  stages = [P(axes[:k]) for k in range(1, len(axes))]
  for spec in stages[::-1] if back else stages:
    sharding = NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
    tree = jax.tree.map(
      lambda x, s=sharding: jax.lax.with_sharding_constraint(x, s), tree
    )
  return tree
