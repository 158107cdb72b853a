"""Sharding support: optimizer-state shardings and a distributed spectral step.

Every transformation of the package runs under `jax.jit` with sharded
params, gradients and state (GSPMD partitions it like any other program).
Two things need help beyond that:

* **State shardings.** `state_shardings(opt, params)` gives the sharding of
  every leaf of `opt.init(params)`, so that optimizer state takes `1/N` of
  its size per device where its parameter is split `N` ways: leaves that
  mirror a parameter (momenta, AdamW and AdaMuon moments) take the
  parameter's sharding, per-matrix state of its own shape (streaming bases,
  NorMuon's moments) is split over the same mesh axes (along the matrix axis
  of a stack, else along its rows; `spread_spec`), and leaves of no
  parameter (counters, injected hyperparameters) are replicated. Pass it as
  `out_shardings` of a jitted `opt.init` and as the state's
  `in_shardings`/`out_shardings` of the training step.

* **The distributed spectral step.** Under plain GSPMD a spectral step on a
  sharded matrix either all-gathers the matrix to every device (SVD/eigh:
  every device then computes every decomposition) or all-reduces a Gram
  matrix in every Newton-Schulz iteration. `grouped_map` instead groups the
  matrices of equal shape (the stacked layer axis of scanned models is part
  of the group), spreads whole matrices over the devices of a mesh (the group
  is padded with zero matrices to a multiple of the device count), runs the
  per-matrix step locally in a `jax.shard_map` (no collective inside), and
  brings the results back: one all-to-all in and one out per group. Enable it
  with `distribute=` on `scale_by_spectral_power`, `scale_by_htmuon`,
  `htmuon`, `muon`, `htnormuon` and `htadamuon`, for every method including
  `method="stream"`, whose per-matrix basis travels with its matrix
  (`matrix_state.update_per_matrix`); `htnormuon` (`scale_by_normuon`) runs
  NorMuon's normalization the same way, each matrix next to its moments. A
  stack of matrices whose count is a multiple of the device count is split
  along the stack in place, so per-matrix state stored that way
  (`state_shardings` of a stacked parameter) does not move at all; the
  state of other matrices moves with them by the same all-to-alls. Nothing
  of the state is gathered.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, TypeVar, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from htmuon_jax import batching

__all__ = [
  "COLLECTIVES",
  "Distribute",
  "DistributeLike",
  "as_distribute",
  "bind_static_args",
  "count_collectives",
  "grouped_map",
  "per_matrix_state",
  "spread_spec",
  "state_shardings",
  "with_auto_axes",
]


class Distribute(NamedTuple):
  """Where the distributed spectral step puts its matrices.

  Attributes:
    mesh: the device mesh; `None` means the mesh set with `jax.set_mesh` (or
      `jax.sharding.use_mesh`) when the step is traced.
    axes: the mesh axes whose devices share the matrices of a group; `None`
      means all axes of the mesh (every device gets whole matrices). Devices
      along the other axes compute the same matrices redundantly.
  """

  mesh: Optional[Mesh] = None
  axes: Optional[tuple[str, ...]] = None


# What `distribute=` accepts: `None` (off), a `Mesh` (all its devices), a
# mesh axis name or a tuple of them (of the context mesh), or a `Distribute`.
DistributeLike = Union[None, Mesh, str, Sequence[str], Distribute]


def as_distribute(distribute: DistributeLike) -> Optional[Distribute]:
  """Normalizes the `distribute=` argument; `None` stays `None` (off).

  Raises:
    ValueError: for anything else than the forms listed in `DistributeLike`.
  """
  if distribute is None or isinstance(distribute, Distribute):
    d = distribute
  elif isinstance(distribute, Mesh):
    d = Distribute(distribute, None)
  elif isinstance(distribute, str):
    d = Distribute(None, (distribute,))
  elif (
    isinstance(distribute, (tuple, list))
    and all(isinstance(a, str) for a in distribute)
    and distribute
  ):
    d = Distribute(None, tuple(distribute))
  else:
    raise ValueError(
      "distribute: expected None, a jax.sharding.Mesh, a mesh axis name, a "
      f"tuple of axis names or a htmuon_jax.sharding.Distribute, got "
      f"{distribute!r}."
    )
  if d is not None and isinstance(d.axes, str):
    d = d._replace(axes=(d.axes,))
  if d is not None and d.mesh is not None and d.axes is not None:
    unknown = [a for a in d.axes if a not in d.mesh.axis_names]
    if unknown:
      raise ValueError(
        f"distribute: axes {unknown} are not axes of the mesh "
        f"{d.mesh.axis_names}."
      )
  return d


def _mesh_and_axes(d: Distribute) -> tuple[Any, tuple[str, ...]]:
  """The concrete (or context) mesh and the axes to spread over."""
  # A concrete Mesh or the context AbstractMesh (same interface here).
  mesh: Any = d.mesh
  context = jax.sharding.get_abstract_mesh()
  if mesh is None:
    mesh = context
    if mesh.empty:
      raise ValueError(
        "distribute: names mesh axes but no mesh is set; pass a Mesh or "
        "Distribute(mesh, axes), or call jax.set_mesh(mesh) first."
      )
  elif not context.empty and context.shape_tuple == mesh.shape_tuple:
    # Same mesh, but with the context's axis types (e.g. auto inside
    # `with_auto_axes`), which shard_map requires to match.
    mesh = context
  elif jax.sharding.AxisType.Explicit in mesh.axis_types:
    # No mesh in context, so the inputs carry no explicit shardings: let the
    # partitioner place them, as for a mesh with auto axes.
    mesh = Mesh(
      mesh.devices,
      mesh.axis_names,
      axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names),
    )
  axes = tuple(mesh.axis_names) if d.axes is None else d.axes
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(
      f"distribute: axes {unknown} are not axes of the mesh "
      f"{tuple(mesh.axis_names)}."
    )
  return mesh, axes


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


def _group_key(item: Any) -> tuple[Any, ...]:
  leaves, treedef = jax.tree.flatten(item)
  return (treedef,) + tuple((x.shape[1:], jnp.dtype(x.dtype)) for x in leaves)


def grouped_map(
  fn: Callable[..., Any],
  items: Sequence[Any],
  distribute: DistributeLike,
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
    distribute: where to run; see `as_distribute`. `None` calls `fn` on each
      item directly (no grouping).
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
  d = as_distribute(distribute)
  if d is None:
    return [fn(item, *args) for item in items]
  mesh, axes = _mesh_and_axes(d)
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
    groups.setdefault(_group_key(item), []).append(i)

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
    chunked = lambda x, *a: batching.map_in_chunks(fn, x, *a)
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


def _key_value(entry: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


# State types registered by `per_matrix_state`: type -> its per-matrix fields.
_PER_MATRIX_STATE: dict[type, tuple[str, ...]] = {}

_T = TypeVar("_T", bound=type)


def per_matrix_state(*fields: str) -> Callable[[_T], _T]:
  """Class decorator: `fields` of this state NamedTuple are per-matrix state.

  Their leaves (one `(batch, ...)` array per matrix leaf of the params, as
  `matrix_state.init_per_matrix` makes) are laid out by `spread_spec` in
  `state_shardings`, along the batch axis of a stack, even where a leaf's
  shape happens to equal its parameter's (the full-rank streaming basis of
  a stack of square matrices), so that the distributed step finds them
  where it computes their matrices.

  Args:
    *fields: names of fields of the decorated NamedTuple.

  Returns:
    The decorator; it returns the class unchanged.
  """

  def register(cls: _T) -> _T:
    _PER_MATRIX_STATE[cls] = tuple(fields)
    return cls

  return register


def _sharding_axes(sharding: Any) -> list[str]:
  """The mesh axes (of size > 1) that `sharding` splits an array over."""
  if not isinstance(sharding, NamedSharding):
    return []
  names = set()
  for entry in sharding.spec:
    if entry is not None:
      names |= set(entry) if isinstance(entry, tuple) else {entry}
  mesh = sharding.mesh
  return [a for a in mesh.axis_names if a in names and mesh.shape[a] > 1]


def spread_spec(shape: Sequence[int], sharding: Any) -> P:
  """A spec for state of `shape` that belongs to a param sharded by `sharding`.

  The state leaf is split over the same mesh axes as its parameter, so it
  takes the same fraction of memory per device, on the first of its axes
  whose size is a multiple of their device count: the matrix (batch) axis of
  a stack of per-matrix state (a stacked parameter), else the next axis (the
  rows of a basis, the units of a second moment). If no axis is a multiple
  of all of them, each mesh axis (in mesh order) goes to the first leaf axis
  it still divides, and a mesh axis that divides none is left out (the leaf
  is replicated over it): shards are always even.

  Args:
    shape: the state leaf's shape.
    sharding: the parameter's sharding (a `NamedSharding`; anything else
      gives a replicated spec).

  Returns:
    A `PartitionSpec` for the state leaf, on the parameter's mesh.
  """
  axes = _sharding_axes(sharding)
  if not axes or not shape:
    return P()
  sizes = sharding.mesh.shape

  def entry(names: Sequence[str]) -> Any:
    if not names:
      return None
    return names[0] if len(names) == 1 else tuple(names)

  n = math.prod(sizes[a] for a in axes)
  for i, size in enumerate(shape):
    if size > 1 and size % n == 0:
      return P(*([None] * i + [entry(axes)]))
  assigned: list[list[str]] = [[] for _ in shape]
  for a in axes:
    for i, size in enumerate(shape):
      k = math.prod(sizes[b] for b in assigned[i]) * sizes[a]
      if size > 1 and size % k == 0:
        assigned[i].append(a)
        break
  while assigned and not assigned[-1]:
    assigned.pop()
  return P(*[entry(names) for names in assigned])


def state_shardings(opt: Any, params: Any, param_shardings: Any = None) -> Any:
  """Shardings for `opt.init(params)` that follow the params' shardings.

  A state leaf belongs to a parameter when the parameter's key path is a
  suffix of the leaf's key path (momenta, AdamW moments, the masked subtrees
  of `optax.partition`, per-matrix state). If the shapes agree (momenta,
  AdamW's and AdaMuon's moments) the leaf gets the parameter's sharding;
  otherwise (per-matrix state of its own shape: streaming bases
  `(batch, rows, rank)`, NorMuon's `(batch, fan_out)` moments) it is split
  over the same mesh axes as its parameter, on its matrix (batch) axis when
  the parameter is a stack of matrices and on its rows otherwise (see
  `spread_spec`), so that every device holds `1/N` of it when the parameter
  is split `N` ways. Leaves of no parameter (step counters, injected
  hyperparameters) are replicated over the mesh.

  Example::

    shardings = htmuon_jax.sharding.state_shardings(opt, params)
    state = jax.jit(opt.init, out_shardings=shardings)(params)

  Args:
    opt: an `optax.GradientTransformation` (anything with `init`).
    params: the parameters: arrays or `jax.ShapeDtypeStruct`s.
    param_shardings: a tree of `jax.sharding.NamedSharding` matching
      `params`; defaults to the `.sharding` of each leaf of `params`.

  Returns:
    A tree of shardings with the structure of `opt.init(params)`.
  """
  if param_shardings is None:
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
  shapes = jax.eval_shape(opt.init, params)
  by_path = {}
  for (path, p), s in zip(
    jax.tree.leaves_with_path(params), jax.tree.leaves(param_shardings)
  ):
    by_path[tuple(_key_value(k) for k in path)] = (tuple(p.shape), s)
  meshes = [
    s.mesh
    for s in jax.tree.leaves(param_shardings)
    if isinstance(s, NamedSharding)
  ]
  if not meshes:
    raise ValueError(
      "param_shardings: expected NamedShardings (jax.sharding.NamedSharding)"
      " for the params."
    )
  replicated = NamedSharding(meshes[0], P())

  # Leaves of the fields that `per_matrix_state` registered
  # (e.g. the streaming basis) are per-matrix state even where their shape
  # happens to equal the parameter's (the full-rank basis of a square
  # matrix): they are laid out by `spread_spec`, along the matrix axis.
  per_matrix: set[str] = set()

  def is_per_matrix_state(node: Any) -> bool:
    return isinstance(node, tuple) and type(node) in _PER_MATRIX_STATE

  def mark(path: Any, node: Any) -> Any:
    if is_per_matrix_state(node):
      for field in _PER_MATRIX_STATE[type(node)]:
        for sub, _ in jax.tree.leaves_with_path(getattr(node, field)):
          per_matrix.add(
            jax.tree_util.keystr(
              tuple(path) + (jax.tree_util.GetAttrKey(field),) + tuple(sub)
            )
          )
    return node

  jax.tree.map_with_path(mark, shapes, is_leaf=is_per_matrix_state)

  def pick(path: Any, leaf: Any) -> Any:
    keys = tuple(_key_value(k) for k in path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is None:
        continue
      shape, sharding = hit
      if (
        shape == tuple(leaf.shape)
        and jax.tree_util.keystr(path) not in per_matrix
      ):
        return sharding
      if not isinstance(sharding, NamedSharding):
        return replicated
      return NamedSharding(sharding.mesh, spread_spec(leaf.shape, sharding))
    return replicated

  return jax.tree.map_with_path(pick, shapes)


def _has_explicit_axes(x: Any) -> bool:
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  return bool(
    mesh is not None
    and not mesh.empty
    and jax.sharding.AxisType.Explicit in mesh.axis_types
  )


def with_auto_axes(fn: Callable[..., Any], xs: Any, *args: Any) -> Any:
  """`fn(xs)`, run with explicit mesh axes switched to auto if there are any.

  Under explicit sharding (mesh axes of type `Explicit`, the default of
  `jax.make_mesh`) ops such as `jnp.linalg.svd` refuse inputs sharded along
  the matrix axes. Inside `jax.sharding.auto_axes` the partitioner chooses
  the layouts as under `jax.jit` with auto axes; the outputs get the inputs'
  shardings back, so `fn` must return arrays shaped like `xs`.

  Args:
    fn: `fn(xs, *args)` returns a tree of the structure and shapes of `xs`.
      Traced values must come in through `args`, not a closure: a closed-over
      value on explicit axes cannot be used in the auto region.
    xs: a tree of arrays.
    *args: further arguments of `fn` (e.g. traced hyperparameters).

  Returns:
    `fn(xs, *args)`.
  """
  leaves = jax.tree.leaves((xs, args))
  explicit = [x for x in leaves if _has_explicit_axes(x)]
  if not explicit:
    return fn(xs, *args)
  mesh = jax.typeof(explicit[0]).sharding.mesh

  def out_sharding(x: jax.Array) -> Any:
    sharding = jax.typeof(x).sharding
    # A leaf without a mesh (e.g. state made by an eager `opt.init` of
    # unsharded params) comes back replicated on the mesh of the others.
    if getattr(sharding, "mesh", None) is None or sharding.mesh.empty:
      return NamedSharding(mesh, P())
    return sharding

  return jax.sharding.auto_axes(
    fn, out_sharding=jax.tree.map(out_sharding, xs)
  )(xs, *args)


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
