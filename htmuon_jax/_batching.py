"""Shape groups and memory-bounded chunks: one program per group of matrices.

A model's matrix leaves come in a few shapes repeated once per layer (24
layers of a LLaMA tree: ~7 leaves each, 3 shapes). Tracing the per-matrix
step once per leaf makes the program, its compile time and XLA's temporary
buffers grow with the number of layers. Here leaves with equal matrix shape
and dtype (and equal state shapes) are concatenated along their batch axis
and the step runs once per group, as a loop over chunks of `k` matrices
(`jax.lax.map`), so the program has one copy of the step per group and at
most `k` matrices' iterates are live at a time. `k` is the largest divisor of
the group's size whose estimated working set fits the memory budget
(`Execution.memory_budget`, default `DEFAULT_MEMORY_BUDGET` bytes).

Which leaves may share a group is `Execution.grouping`, an option of the
optimizer (`distribute=htmuon_jax.Execution(grouping=...)`), fixed when it
is built: no module-level setting changes a traced program. Under GSPMD
(`distribute=None` with sharded parameters) a leaf's sharding is not visible
while tracing, and concatenating leaves that are sharded differently (a
tensor-parallel column- and row-split pair of equal shape, or a matrix and
a transpose) makes XLA reshard one of them (measured on 8 CPU devices: two
extra all-to-alls). So the default, "auto", groups on one accelerator
device only; with more devices each leaf runs on its own unless the user
says its equal-shape leaves share a sharding (`grouping="shapes"`).
`distribute=mesh` does its own grouping with explicit all-to-alls and is
not affected. On a CPU backend "auto" runs each leaf on its own too: XLA's
CPU runtime runs separate leaves' steps concurrently, and a grouped step
measured 10-35% slower there (8 LLaMA-60M-sized leaves, 2 cores); the
program-size win is for accelerators, where `method="auto"` runs the
polynomial. `grouping="transposes"` groups on CPU as well.

The same modes decide whether an alias's whole chain (momentum, scaling,
weight decay, the learning rate, AdamW) runs once per group of equal leaves
(`shape_groups.group_leaves`, on one device only), so that the program does
not grow with the number of layers outside the spectral step either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


# 512 MiB of working set per chunk: a 2048 x 2048 fp32 matrix's polynomial
# iteration holds ~10 matrix-sized buffers (~170 MB), so it runs 3 at a time;
# a 2048 x 8192 one runs alone; small matrices run in large batches.
DEFAULT_MEMORY_BUDGET = 512 * 2**20
# Buffers of one matrix's step (iterates, Gram matrices, weighted sums), in
# units of the matrix's size: the estimate behind the chunk size.
_LIVE_BUFFERS = 10

# "transposes": equal matrix shapes and dtypes, tall matrices joining their
# wide transposes (transpose-equivariant steps); "shapes": equal shapes
# only; "off": one program per leaf; "auto": "transposes" when the program
# runs on one accelerator device, "off" on CPU and when it may be
# partitioned over several devices.
GROUPINGS = ("auto", "transposes", "shapes", "off")


def check_grouping(grouping: str) -> None:
  """Raises ValueError unless `grouping` is one of `GROUPINGS`."""
  if grouping not in GROUPINGS:
    raise ValueError(
      f"grouping: expected one of {GROUPINGS}, got {grouping!r}."
    )


def check_memory_budget(nbytes: int | None) -> None:
  """Raises ValueError unless `nbytes` is None or a positive int."""
  if nbytes is not None and (
    isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0
  ):
    raise ValueError(
      f"memory_budget: needs a positive number of bytes or None, got "
      f"{nbytes!r}."
    )


def resolved_grouping(grouping: str) -> str:
  """`grouping` with "auto" resolved for this run (when traced)."""
  if grouping != "auto":
    return grouping
  one_accelerator = jax.device_count() == 1 and jax.default_backend() != "cpu"
  return "transposes" if one_accelerator else "off"


def entry_bytes(item: Any) -> int:
  """Estimated working set of one batch entry of `item` (bytes)."""
  total = 0
  for leaf in jax.tree.leaves(item):
    size = math.prod(leaf.shape[1:])
    total += size * max(np.dtype(leaf.dtype).itemsize, 4)
  return _LIVE_BUFFERS * total


def _batch(item: Any) -> int:
  return jax.tree.leaves(item)[0].shape[0]


def too_large_to_join(item: Any, budget: int | None) -> bool:
  """A stack of several matrices too large for one chunk: it runs alone.

  It is already a loop of its own (one traced step, whatever the number of
  layers), and joining it to a group would copy it (XLA's temporaries
  doubled on a scan-stacked LLaMA-1B tree). Single matrices and small
  stacks are joined.
  """
  return (
    budget is not None
    and _batch(item) > 1
    and _batch(item) * entry_bytes(item) > budget
  )


def chunk_size(n: int, entry_bytes: int, budget: int | None) -> int:
  """Largest divisor of `n` whose chunk fits `budget` (at least 1)."""
  if budget is None or n * entry_bytes <= budget:
    return n
  limit = max(1, budget // max(entry_bytes, 1))
  return max(k for k in range(1, min(n, limit) + 1) if n % k == 0)


def map_in_chunks(
  fn: Callable[..., Any],
  x: Any,
  *args: Any,
  budget: int | None,
) -> Any:
  """`fn(x, *args)` for a batched per-entry `fn`, in memory-bounded chunks.

  Args:
    fn: maps a pytree of `(b, ...)` arrays to a pytree of `(b, ...)` arrays,
      each batch entry independently.
    x: a pytree of arrays sharing a leading batch axis.
    *args: extra arguments, passed whole to every chunk.
    budget: bytes per chunk; `None` runs the batch whole.

  Returns:
    `fn(x, *args)`, computed as a `jax.lax.map` over chunks of `k` entries
    when the whole batch would exceed the budget.
  """
  leaves = jax.tree.leaves(x)
  n = leaves[0].shape[0]
  k = chunk_size(n, entry_bytes(x), budget)
  if k == n:
    return fn(x, *args)
  chunks = jax.tree.map(lambda a: a.reshape((n // k, k) + a.shape[1:]), x)
  out = jax.lax.map(lambda c: fn(c, *args), chunks)
  return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)


def group_key(item: Any) -> tuple[Any, ...]:
  """Items with equal keys can share one program: structure, shapes, dtypes."""
  leaves, treedef = jax.tree.flatten(item)
  return (
    treedef,
    tuple((leaf.shape[1:], jnp.dtype(leaf.dtype)) for leaf in leaves),
  )


def grouped_apply(
  fn: Callable[..., Any],
  items: Sequence[Any],
  *,
  args: Sequence[Any] = (),
  transpose_equivariant: bool = False,
  budget: int | None,
  grouping: str,
) -> list[Any]:
  """`[fn(item, *args) for item in items]`, one traced `fn` per shape group.

  Items whose leaves have equal shapes after the batch axis and dtypes are
  concatenated along it and run through `map_in_chunks`; the results are
  split back. Single items with a batch of 1 are called directly.

  Args:
    fn: a batched per-entry function (as for `map_in_chunks`).
    items: pytrees of arrays with a leading batch axis.
    args: extra arguments of `fn`.
    transpose_equivariant: each item is a single `(B, m, n)` array and
      `fn(x^T) = fn(x)^T`: tall items join the group of their wide
      transposes.
    budget: bytes per chunk; `None` runs each group whole.
    grouping: one of `GROUPINGS`.

  Returns:
    The results, in the order of `items`.
  """
  items = list(items)
  mode = resolved_grouping(grouping)
  if mode == "off":
    return [map_in_chunks(fn, x, *args, budget=budget) for x in items]
  alone = [too_large_to_join(x, budget) for x in items]
  flipped = [False] * len(items)
  if transpose_equivariant and mode == "transposes":
    for i, x in enumerate(items):
      if not alone[i] and x.ndim == 3 and x.shape[1] > x.shape[2]:
        items[i], flipped[i] = jnp.swapaxes(x, 1, 2), True
  groups: dict[Any, list[int]] = {}
  for i, item in enumerate(items):
    key = ("alone", i) if alone[i] else group_key(item)
    groups.setdefault(key, []).append(i)
  results: list[Any] = [None] * len(items)
  for members in groups.values():
    if len(members) == 1:
      results[members[0]] = map_in_chunks(
        fn, items[members[0]], *args, budget=budget
      )
      continue
    sizes = [_batch(items[i]) for i in members]
    joined = jax.tree.map(
      lambda *xs: jnp.concatenate(xs, axis=0), *[items[i] for i in members]
    )
    out = map_in_chunks(fn, joined, *args, budget=budget)
    bounds = np.cumsum([0] + sizes)
    for i, lo, hi in zip(members, bounds[:-1], bounds[1:]):
      results[i] = jax.tree.map(lambda y, lo=lo, hi=hi: y[lo:hi], out)
  return [jnp.swapaxes(r, 1, 2) if f else r for r, f in zip(results, flipped)]
