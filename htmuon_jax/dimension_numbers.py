"""Which axes of a parameter form the matrix that a spectral step acts on.

We reuse `optax.contrib.MuonDimensionNumbers`: `reduction_axis` is fan-in (axis
0 of a Flax `(in, out)` kernel), `output_axis` is fan-out, every other axis is
a batch axis whose slices are treated as independent matrices (conv kernels
flatten their spatial and input axes into fan-in; stacked layers put the layer
axis into the batch).

A *dimension-number tree* holds, for each parameter leaf, either a
`MuonDimensionNumbers` (the leaf is a matrix, or a batch of them) or `None`
(the leaf is not a matrix and passes through spectral transformations
unchanged). Users may give it as `None` (the default routing), a single
`MuonDimensionNumbers` (applies to every leaf), a tree that is a prefix of the
params, or a callable that returns such a tree from the params.

The default routing is optax's (2-D leaves are matrices) made safe for
scanned models: a stacked `(L, in, out)` kernel is `L` matrices and a stacked
`(L, d)` norm scale or bias is not a matrix. Stacked axes come from Flax's
`"layers"` axis names or are inferred from the module's stacked biases and
norm scales (`param_tree.infer_stacked_axes`). The inference needs the
whole tree: inside `optax.partition`/`optax.masked` the masked-out leaves
carry no shape, which is why `alias.partition_matrices` resolves dimension
numbers on the full tree before it partitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
from optax.contrib import MuonDimensionNumbers
from optax.transforms import MaskedNode

from htmuon_jax import equinox_layouts  # no equinox import
from htmuon_jax import param_tree  # duck-typed Flax metadata, no flax import

WeightDimNumOrFn = Union[MuonDimensionNumbers, Any, Callable[[Any], Any], None]

__all__ = [
  "MuonDimensionNumbers",
  "WeightDimNumOrFn",
  "is_dim_leaf",
  "is_dimension_function",
  "is_dimension_numbers",
  "resolve_dimension_numbers",
  "fan_in_fan_out",
  "to_matrices",
  "from_matrices",
]


def is_dimension_numbers(x: Any) -> bool:
  return isinstance(x, MuonDimensionNumbers)


def is_dimension_function(x: Any) -> bool:
  """A callable to be called on the params, not a (callable) pytree.

  Equinox modules are callable pytrees: a dimension-number tree shaped like
  an Equinox model is a tree, not a function.
  """
  if not callable(x) or is_dimension_numbers(x):
    return False
  if isinstance(x, jax.tree_util.Partial):
    return True
  return jax.tree_util.treedef_is_leaf(
    jax.tree.structure(x, is_leaf=is_dim_leaf)
  )


def is_dim_leaf(x: Any) -> bool:
  """A leaf of a dimension-number tree: `None`, dimension numbers, or a
  `MaskedNode` (the masked leaves of `optax.partition`)."""
  return x is None or is_dimension_numbers(x) or isinstance(x, MaskedNode)


# Leaves with these names are never matrices, whatever their rank: a stacked
# (scanned) norm scale `(L, d)` is 2-D but not a weight matrix.
NON_MATRIX_NAMES = param_tree.NON_MATRIX_NAMES
# Logical axis names (Flax partitioning metadata) that mark a stacked axis.
STACK_AXIS_NAMES = ("layers",)


def _default_rule(
  path: Any, leaf: Any, stacked: int
) -> MuonDimensionNumbers | None:
  """The default routing: a leaf is a matrix if it is 2-D once unstacked.

  * leaves named `bias` or `scale` are never matrices (stacked norms);
  * stacked axes are those with a stack axis name (`"layers"`, the usual
    `nnx.PARTITION_NAME` of a scan) on a Flax-boxed leaf (`nnx.Variable`,
    `nn.Partitioned`), else the `stacked` leading axes that
    `param_tree.infer_stacked_axes` found from the module's stacked biases
    and norm scales;
  * a leaf with exactly two other axes is a matrix (a batch of them over the
    stacked axes), as `optax.contrib.muon`'s 2-D rule for unstacked leaves.
  """
  keys = param_tree.leaf_keys(path)
  if keys and keys[-1] in NON_MATRIX_NAMES:
    return None
  shape = param_tree.leaf_shape(leaf)
  names = param_tree.axis_names(leaf) if param_tree.is_boxed(leaf) else None
  batch = param_tree.stacked_axes(shape, names, STACK_AXIS_NAMES, stacked)
  core = [i for i in range(len(shape)) if i not in batch]
  if len(core) != 2:
    return None
  if not batch:
    return MuonDimensionNumbers()
  return MuonDimensionNumbers(reduction_axis=core[0], output_axis=core[1])


def _default_dimension_numbers(params: Any) -> Any:
  base = _name_default_dimension_numbers(params)
  if not any(
    equinox_layouts.is_equinox_layer(x)
    for x in jax.tree.leaves(params, is_leaf=equinox_layouts.is_equinox_layer)
  ):
    return base
  # Equinox layers in the tree: their true axes replace the name rules.
  return jax.tree.map(
    lambda node, dims: (
      equinox_layouts.layer_dimension_numbers(node)
      if equinox_layouts.is_equinox_layer(node)
      else dims
    ),
    params,
    base,
    is_leaf=equinox_layouts.is_equinox_layer,
  )


def _name_default_dimension_numbers(params: Any) -> Any:
  is_leaf = lambda x: param_tree.is_boxed(x) or isinstance(x, MaskedNode)
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf, k: (
      leaf if isinstance(leaf, MaskedNode) else _default_rule(path, leaf, k)
    ),
    params,
    param_tree.infer_stacked_axes(params),
    is_leaf=is_leaf,
  )


def resolve_dimension_numbers(
  weight_dimension_numbers: WeightDimNumOrFn, params: Any
) -> Any:
  """Expands user dimension numbers into a tree with one entry per leaf.

  Args:
    weight_dimension_numbers: `None` (the default routing: leaves that are
      2-D once their stacked layer axes are set aside are matrices, except
      those named `bias`/`scale`; stacked axes are read from Flax `"layers"`
      axis names or inferred from stacked biases and norm scales, see
      `_default_rule`), a `MuonDimensionNumbers` applied to every leaf, a
      tree of `MuonDimensionNumbers | None` that is a prefix of `params`, or
      a callable returning any of these from `params`.
    params: the parameter (or update) tree. `optax.MaskedNode` subtrees, as
      produced by `optax.partition`, are kept as they are.

  Returns:
    A tree with the structure of `params` whose leaves are
    `MuonDimensionNumbers` or `None`.
  """
  dim_nums = weight_dimension_numbers
  if is_dimension_function(dim_nums):
    dim_nums = dim_nums(params)  # type: ignore[misc]
  if dim_nums is None:
    dim_nums = _default_dimension_numbers(params)
  if is_dimension_numbers(dim_nums):
    return jax.tree.map(lambda _: dim_nums, params)

  def broadcast(d: Any, subtree: Any) -> Any:
    if isinstance(d, MaskedNode):
      return subtree
    return jax.tree.map(lambda _: d, subtree)

  try:
    return jax.tree.map(broadcast, dim_nums, params, is_leaf=is_dim_leaf)
  except ValueError as e:
    raise ValueError(
      "weight_dimension_numbers must be None, a MuonDimensionNumbers, a "
      "prefix tree of the params or a callable returning one; its structure "
      f"does not match the params: {e}"
    ) from e


def map_with_dimension_numbers(
  fn: Callable[..., Any], dim_tree: Any, tree: Any, *rest: Any
) -> Any:
  """`jax.tree.map(fn, dim, leaf, *rest_leaves)` over a resolved dim tree.

  `MaskedNode`s are empty subtrees in both trees, so `fn` never sees them.
  """
  return jax.tree.map(
    fn,
    dim_tree,
    tree,
    *rest,
    is_leaf=lambda x: x is None or is_dimension_numbers(x),
  )


def _normalize_axes(
  ndim: int, dim_nums: MuonDimensionNumbers
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  def norm(axes: Any, name: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    for ax in axes:
      if not -ndim <= ax < ndim:
        raise ValueError(
          f"weight_dimension_numbers: {name}={ax} is out of range for a "
          f"parameter of rank {ndim}."
        )
    return tuple(ax % ndim for ax in axes)

  reduction = norm(dim_nums.reduction_axis, "reduction_axis")
  output = norm(dim_nums.output_axis, "output_axis")
  if not reduction or not output:
    raise ValueError(
      "weight_dimension_numbers: reduction_axis and output_axis must each "
      f"name at least one axis, got {dim_nums}."
    )
  if set(reduction) & set(output):
    raise ValueError(
      "weight_dimension_numbers: reduction_axis and output_axis must be "
      f"disjoint, got {dim_nums} for a parameter of rank {ndim}."
    )
  return reduction, output


def _check_matrix(
  shape: tuple[int, ...], dim_nums: MuonDimensionNumbers
) -> None:
  if len(shape) < 2:
    raise ValueError(
      "weight_dimension_numbers: a spectral method needs a matrix, but a "
      f"parameter of shape {shape} was given {dim_nums}. Map non-matrix "
      "leaves to None."
    )


def fan_in_fan_out(
  shape: tuple[int, ...], dim_nums: MuonDimensionNumbers
) -> tuple[int, int]:
  """Products of the reduction (fan-in) and output (fan-out) axis sizes."""
  _check_matrix(shape, dim_nums)
  reduction, output = _normalize_axes(len(shape), dim_nums)
  return (
    math.prod(shape[a] for a in reduction),
    math.prod(shape[a] for a in output),
  )


def _layout(
  shape: tuple[int, ...], dim_nums: MuonDimensionNumbers
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  _check_matrix(shape, dim_nums)
  reduction, output = _normalize_axes(len(shape), dim_nums)
  batch = tuple(a for a in range(len(shape)) if a not in reduction + output)
  perm = batch + reduction + output
  flat = (
    math.prod(shape[a] for a in batch),
    math.prod(shape[a] for a in reduction),
    math.prod(shape[a] for a in output),
  )
  return perm, flat, tuple(shape[a] for a in perm)


def to_matrices(x: jax.Array, dim_nums: MuonDimensionNumbers) -> jax.Array:
  """Reshapes `x` to a `(batch, fan_in, fan_out)` stack of matrices."""
  perm, flat, _ = _layout(x.shape, dim_nums)
  return jnp.transpose(x, perm).reshape(flat)


def from_matrices(
  m: jax.Array, dim_nums: MuonDimensionNumbers, shape: tuple[int, ...]
) -> jax.Array:
  """Inverse of `to_matrices` for a parameter of the given `shape`."""
  perm, _, permuted_shape = _layout(shape, dim_nums)
  inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
  return jnp.transpose(m.reshape(permuted_shape), inverse)
