"""Running per-matrix code under explicit mesh axes (`with_auto_axes`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


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
