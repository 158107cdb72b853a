"""Optimizer-state shardings that follow the params' shardings.

`state_shardings(opt, params)` gives the sharding of every leaf of
`opt.init(params)`: leaves that mirror a parameter take its sharding,
per-matrix state (the fields a state type declares with
`per_matrix_state`) is split over the same mesh axes by `spread_spec`, and
leaves of no parameter are replicated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _key_value(entry: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


_T = TypeVar("_T", bound=type)

# The class attribute that declares a state type's per-matrix fields.
PER_MATRIX_FIELDS = "per_matrix_fields"


def per_matrix_state(*fields: str) -> Callable[[_T], _T]:
  """Class decorator: `fields` of this state NamedTuple are per-matrix state.

  Their leaves (one `(batch, ...)` array per matrix leaf of the params, as
  `_grouping.init_per_matrix` makes) are laid out by `spread_spec` in
  `state_shardings`, along the batch axis of a stack, even where a leaf's
  shape happens to equal its parameter's (the full-rank streaming basis of
  a stack of square matrices), so that the distributed step finds them
  where it computes their matrices.

  The declaration lives on the type itself, as its class attribute
  `per_matrix_fields` (which a state type may also set in its body), so a
  subclass inherits it and a type names its own layout.

  Args:
    *fields: names of fields of the decorated NamedTuple.

  Returns:
    The decorator; it returns the class, with `per_matrix_fields` set.

  Raises:
    ValueError: for a name that is not a field of the class.
  """

  def register(cls: _T) -> _T:
    unknown = [f for f in fields if f not in getattr(cls, "_fields", ())]
    if unknown:
      raise ValueError(
        f"per_matrix_state: {unknown} are not fields of {cls.__name__}."
      )
    setattr(cls, PER_MATRIX_FIELDS, tuple(fields))
    return cls

  return register


def per_matrix_fields(node: Any) -> tuple[str, ...]:
  """The per-matrix fields a state node's type declares (none: `()`)."""
  if not isinstance(node, tuple):
    return ()
  return tuple(getattr(type(node), PER_MATRIX_FIELDS, ()))


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

  # Leaves of the fields that a state type declares (`per_matrix_state`)
  # (e.g. the streaming basis) are per-matrix state even where their shape
  # happens to equal the parameter's (the full-rank basis of a square
  # matrix): they are laid out by `spread_spec`, along the matrix axis.
  per_matrix: set[str] = set()

  def is_per_matrix_state(node: Any) -> bool:
    return bool(per_matrix_fields(node))

  def mark(path: Any, node: Any) -> Any:
    if is_per_matrix_state(node):
      for field in per_matrix_fields(node):
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
