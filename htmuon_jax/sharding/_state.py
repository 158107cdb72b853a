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
  attr = next((a for a in ("key", "name", "idx") if hasattr(entry, a)), None)
  return entry if attr is None else getattr(entry, attr)


_T = TypeVar("_T", bound=type)

# The class attribute that declares a state type's per-matrix fields.
PER_MATRIX_FIELDS = "per_matrix_fields"


def per_matrix_state(*fields: str) -> Callable[[_T], _T]:
  """Class decorator: `fields` of this state NamedTuple are per-matrix state.

  `state_shardings` lays their leaves out by `spread_spec` even where a
  leaf's shape equals its parameter's. Sets the inherited class attribute
  `per_matrix_fields`.

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

  Split over the parameter's mesh axes, on the first leaf axis their device
  count divides (a stack's batch axis, else rows or units); otherwise each
  mesh axis goes to the first leaf axis it still divides, or is left out:
  shards are always even.

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

  # One mesh axis by name, several as a tuple, none as None.
  entry = lambda names: (names[0] if len(names) == 1 else tuple(names)) or None

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

  A leaf whose key path ends with a parameter's path gets the parameter's
  sharding if the shapes agree, else (per-matrix state) a `spread_spec` on
  its mesh; leaves of no parameter are replicated (docs/sharding.md).

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

  # Declared per-matrix fields (the streaming basis) are spread even where
  # their shape equals the parameter's (the full-rank basis of a square one).
  per_matrix: set[str] = set()

  def mark(path: Any, node: Any) -> Any:
    for field in per_matrix_fields(node):
      for sub, _ in jax.tree.leaves_with_path(getattr(node, field)):
        key = (*path, jax.tree_util.GetAttrKey(field), *sub)
        per_matrix.add(jax.tree_util.keystr(key))
    return node

  jax.tree.map_with_path(
    mark, shapes, is_leaf=lambda n: bool(per_matrix_fields(n))
  )

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
