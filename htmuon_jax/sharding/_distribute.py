"""`distribute=`: how an optimizer's matrix work runs, as one `Execution`.

Where the distributed spectral step puts its matrices (`Distribute`), which
equal-shape leaves share one traced step and how much memory a chunk of
matrices may take: options of the optimizer, fixed when it is built. And
`with_auto_axes`, which runs per-matrix code under explicit mesh axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


# 512 MiB of working set per chunk: a 2048 x 2048 fp32 matrix's polynomial
# step holds ~10 matrix-sized buffers (~170 MB), so 3 run at a time.
DEFAULT_MEMORY_BUDGET = 512 * 2**20
# "transposes": equal shapes and dtypes, tall matrices joining their wide
# transposes; "shapes": equal shapes only; "off": one program per leaf;
# "auto": "transposes" on one accelerator device, "shapes" on several
# where shardings are explicit (in the types), else "off".
GROUPINGS = ("auto", "transposes", "shapes", "off")


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
      "tuple of axis names, a htmuon_jax.sharding.Distribute or a "
      f"htmuon_jax.Execution, got "
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


@dataclasses.dataclass(frozen=True)
class Execution:
  """How an optimizer's matrix work runs: one value, set at construction.

  Pass it as `distribute=` to an alias or transformation; the other forms
  of `distribute=` (a `Mesh`, axis names, a `Distribute`) are
  `Execution(distribute=...)` with the defaults below.

  Attributes:
    distribute: `None` (each device runs its own matrices under GSPMD, or
      the one device all of them), or where the distributed spectral step
      spreads whole matrices (a `Mesh`, mesh axis name(s), a `Distribute`);
      normalized to a `Distribute` or `None`.
    grouping: which equal-shape matrix leaves share one traced step:
      `"auto"` (default: `"transposes"` on one accelerator device,
      `"shapes"` on several where explicit mesh axes show the shardings,
      each leaf alone on CPU and otherwise under GSPMD on several devices),
      `"transposes"` (equal shapes, tall ones joining their wide
      transposes), `"shapes"` (equal shapes only; under GSPMD, for leaves
      you know share a sharding, or with equal shardings where explicit
      mesh axes show them) or `"off"`.
    memory_budget: bytes of working set per chunk of a group's matrices
      (default 512 MiB), or `None` to run each group whole.
    shardings: under automatic mesh axes, where the types do not show them,
      the parameters' shardings: a tree like the params of `PartitionSpec`s
      or `NamedSharding`s (e.g. `jax.jit`'s `in_shardings` for them).
      Leaves then group as under explicit axes: with equal shardings only,
      joined along an axis the sharding leaves whole. Normalized to
      `(path, PartitionSpec)` pairs.
  """

  distribute: Any = None
  grouping: str = "auto"
  memory_budget: Optional[int] = DEFAULT_MEMORY_BUDGET
  shardings: Any = None

  def __post_init__(self) -> None:
    object.__setattr__(self, "distribute", as_distribute(self.distribute))
    if self.grouping not in GROUPINGS:
      raise ValueError(
        f"grouping: expected one of {GROUPINGS}, got {self.grouping!r}."
      )
    if self.shardings is not None:
      object.__setattr__(self, "shardings", _stated(self.shardings))
    budget = self.memory_budget
    if budget is not None and (
      isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0
    ):
      raise ValueError(
        f"memory_budget: needs a positive number of bytes or None, got "
        f"{budget!r}."
      )


def _stated(tree: Any) -> tuple[tuple[str, P], ...]:
  """`Execution.shardings` as hashable `(key path, spec)` pairs."""
  pair = lambda x: isinstance(x, tuple) and len(x) == 2
  if (
    isinstance(tree, tuple)
    and tree
    and all(
      pair(x) and isinstance(x[0], str) and isinstance(x[1], P) for x in tree
    )
  ):
    return tree  # already normalized (dataclasses.replace)
  is_spec = lambda x: isinstance(x, (P, NamedSharding))
  pairs = jax.tree.leaves_with_path(tree, is_leaf=is_spec)
  bad = [x for _, x in pairs if not is_spec(x)]
  if bad or not pairs:
    raise ValueError(
      "shardings: expected a tree of PartitionSpecs or NamedShardings like "
      f"the params, got {bad[0] if bad else tree!r}."
    )
  return tuple(
    (jax.tree_util.keystr(k), getattr(x, "spec", x)) for k, x in pairs
  )


# The defaults (a frozen value, safe to share).
DEFAULT_EXECUTION = Execution()

# What `distribute=` accepts.
ExecutionLike = Union[DistributeLike, Execution]


def as_execution(distribute: ExecutionLike) -> Execution:
  """Normalizes `distribute=` to an `Execution`.

  Raises:
    ValueError: for anything else than the forms of `ExecutionLike`.
  """
  if isinstance(distribute, Execution):
    return distribute
  return Execution(distribute=distribute)


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
