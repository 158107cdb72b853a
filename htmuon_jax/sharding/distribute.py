"""`distribute=`: where the distributed spectral step puts its matrices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
from jax.sharding import Mesh

__all__ = ["Distribute", "DistributeLike", "as_distribute", "mesh_and_axes"]


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


def mesh_and_axes(d: Distribute) -> tuple[Any, tuple[str, ...]]:
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
