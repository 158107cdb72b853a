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
import re
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from optax.contrib import MuonDimensionNumbers
from optax.transforms import MaskedNode

from htmuon_jax import _equinox_layouts as equinox_layouts  # no equinox import
from htmuon_jax import (
  _param_tree as param_tree,
)  # duck-typed Flax metadata, no flax import

WeightDimNumOrFn = Union[MuonDimensionNumbers, Any, Callable[[Any], Any], None]


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
  path: Any, leaf: Any, stacked: int, orientation: str = "in_out"
) -> MuonDimensionNumbers | None:
  """The default routing: a leaf is a matrix if it is 2-D once unstacked.

  * leaves named `bias` or `scale`, and norms' `weight`s (by the module's
    name, `param_tree.is_non_matrix`) are never matrices (stacked norms);
  * stacked axes are those with a stack axis name (`"layers"`, the usual
    `nnx.PARTITION_NAME` of a scan) on a Flax-boxed leaf (`nnx.Variable`,
    `nn.Partitioned`), else the `stacked` leading axes that
    `param_tree.infer_stacked_axes` found from the module's stacked biases
    and norm scales;
  * a leaf with exactly two other axes is a matrix (a batch of them over the
    stacked axes), as `optax.contrib.muon`'s 2-D rule for unstacked leaves.
  """
  keys = param_tree.leaf_keys(path)
  if param_tree.is_non_matrix(keys):
    return None
  shape = param_tree.leaf_shape(leaf)
  names = param_tree.axis_names(leaf) if param_tree.is_boxed(leaf) else None
  batch = param_tree.stacked_axes(shape, names, STACK_AXIS_NAMES, stacked)
  core = [i for i in range(len(shape)) if i not in batch]
  if len(core) != 2:
    return None
  if orientation == "out_in" and not param_tree.is_embedding_path(keys):
    # Embeddings are read vocab -> d in every orientation.
    core = core[::-1]
  if not batch and core == [0, 1]:
    return MuonDimensionNumbers()
  return MuonDimensionNumbers(reduction_axis=core[0], output_axis=core[1])


def _default_dimension_numbers(params: Any, orientation: str = "in_out") -> Any:
  base = _name_default_dimension_numbers(params, orientation)
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


def _name_default_dimension_numbers(
  params: Any, orientation: str = "in_out"
) -> Any:
  is_leaf = lambda x: param_tree.is_boxed(x) or isinstance(x, MaskedNode)
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf, k: (
      leaf
      if isinstance(leaf, MaskedNode)
      else _default_rule(path, leaf, k, orientation)
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
    weight_dimension_numbers: a `DimensionRules` (`dimension_rules`), `None`
      (the default routing: leaves that are
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
  if isinstance(dim_nums, DimensionRules):
    return dim_nums.resolve(params)
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


# ---------------------------------------------------------------------------
# Rules: path patterns -> layouts, an orientation, an embeddings/head policy.

Layout = Union[None, str, MuonDimensionNumbers]
_AXIS_TOKENS = {"in": "in", "window": "in", "out": "out", "batch": "batch"}
_LAYOUT_WORDS = ("auto", "adamw")
POLICIES = ("spectral", "adamw", "authors")
ORIENTATIONS = ("in_out", "out_in")


def _axis_spec(layout: str) -> Optional[tuple[str, ...]]:
  """`"out in"`, `"(out, in)"`, `"out_in"`, `"out in window window"`, ..."""
  text = layout.replace("(", " ").replace(")", " ").replace(",", " ")
  words = text.replace("_", " ").split()
  if not words or any(w not in _AXIS_TOKENS for w in words):
    return None
  return tuple(_AXIS_TOKENS[w] for w in words)


def _check_layout(layout: Any, where: str) -> Layout:
  if layout is None or is_dimension_numbers(layout):
    return layout
  if isinstance(layout, str):
    if layout in _LAYOUT_WORDS:
      return layout
    spec = _axis_spec(layout)
    if spec is not None and "in" in spec and "out" in spec:
      return layout
  raise ValueError(
    f"{where}: a layout is None or 'adamw' (not a matrix), 'auto' (the "
    "default routing), a MuonDimensionNumbers, or axis names of the "
    "trailing axes, 'in', 'out', 'window' (fan-in) and 'batch', e.g. "
    f"'out in' or 'out in window window'; got {layout!r}."
  )


class _FallThrough:
  pass


_FALL_THROUGH = _FallThrough()


def _apply_layout(
  layout: Layout, keys: tuple[str, ...], shape: tuple[int, ...]
) -> Any:
  """The dimension numbers a layout gives one leaf (or `_FALL_THROUGH`)."""
  if layout is None or layout == "adamw":
    return None
  if is_dimension_numbers(layout):
    return layout
  if layout == "auto":
    return _FALL_THROUGH
  spec = _axis_spec(layout)  # type: ignore[arg-type]
  assert spec is not None
  if len(shape) < len(spec) or param_tree.is_non_matrix(keys):
    # Biases, norm gains and leaves of too low a rank are not matrices.
    return _FALL_THROUGH
  offset = len(shape) - len(spec)
  red = tuple(offset + i for i, t in enumerate(spec) if t == "in")
  out = tuple(offset + i for i, t in enumerate(spec) if t == "out")
  return MuonDimensionNumbers(
    reduction_axis=red[0] if len(red) == 1 else red,
    output_axis=out[0] if len(out) == 1 else out,
  )


def _embedding_dims(shape: tuple[int, ...], policy: str) -> Any:
  if len(shape) < 2:
    return None
  if policy == "adamw":
    return None
  vocab, d = len(shape) - 2, len(shape) - 1
  if policy == "authors":  # PyTorch's `(vocab, d)` seen as `(out, in)`.
    vocab, d = d, vocab
  return MuonDimensionNumbers(reduction_axis=vocab, output_axis=d)


def _equinox_embedding_paths(params: Any) -> set[str]:
  """`/`-joined paths of the weights of Equinox `Embedding` layers."""
  flat = jax.tree_util.tree_flatten_with_path(
    params, is_leaf=equinox_layouts.is_equinox_layer
  )[0]
  return {
    "/".join(param_tree.leaf_keys(path) + ("weight",))
    for path, node in flat
    if equinox_layouts.is_embedding(node)
  }


class DimensionRules:
  """Which leaves are matrices, and their axes, by rules on leaf paths.

  Built by `dimension_rules`; pass it as `muon_weight_dimension_numbers`
  (aliases) or `weight_dimension_numbers` (transformations, `leaf_routes`,
  `describe_routing`). It is not callable, so `optax.inject_hyperparams`
  passes it through unchanged (no `static_args` needed). Equal rules compare
  and hash equal.
  """

  __slots__ = ("rules", "default", "orientation", "embeddings", "head")

  def __init__(
    self,
    rules: tuple[tuple[str, Layout], ...],
    default: Layout,
    orientation: str,
    embeddings: str,
    head: str,
  ):
    self.rules = rules
    self.default = default
    self.orientation = orientation
    self.embeddings = embeddings
    self.head = head

  def _key(self) -> tuple[Any, ...]:
    return (
      self.rules,
      self.default,
      self.orientation,
      self.embeddings,
      self.head,
    )

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, DimensionRules) and self._key() == other._key()

  def __hash__(self) -> int:
    return hash(self._key())

  def __repr__(self) -> str:
    return (
      f"dimension_rules({dict(self.rules)!r}, default={self.default!r}, "
      f"orientation={self.orientation!r}, embeddings={self.embeddings!r}, "
      f"head={self.head!r})"
    )

  def _base(self, params: Any) -> Any:
    if self.default == "auto":
      return _default_dimension_numbers(params, self.orientation)
    if self.default == "flax":
      from htmuon_jax import (
        _flax_layouts as flax_layouts,
      )  # no flax import either

      return flax_layouts.flax_dimension_numbers(params)
    return None  # per leaf, from the default layout

  def explain(self, keys: tuple[str, ...], shape: tuple[int, ...]) -> str:
    """Why a leaf that these rules send to AdamW is there ('' if unknown)."""
    joined = "/".join(keys)
    for pattern, layout in self.rules:
      if re.search(pattern, joined):
        if _apply_layout(layout, keys, shape) is None:
          return f"rule {pattern!r}"
        break
    if len(shape) >= 2 and param_tree.is_embedding_path(keys):
      return "embedding" if self.embeddings == "adamw" else ""
    if len(shape) >= 2 and param_tree.is_head_path(keys):
      return "output head" if self.head == "adamw" else ""
    return ""

  def resolve(self, params: Any) -> Any:
    """The dimension-number tree of `params` (structure of `params`)."""
    base = self._base(params)
    embeddings = _equinox_embedding_paths(params)
    is_leaf = lambda x: param_tree.is_boxed(x) or isinstance(x, MaskedNode)

    def rule(path: Any, leaf: Any, dims: Any = None) -> Any:
      if isinstance(leaf, MaskedNode):
        return leaf
      keys = param_tree.leaf_keys(path)
      joined = "/".join(keys)
      shape = param_tree.leaf_shape(leaf)
      for pattern, layout in self.rules:
        if re.search(pattern, joined):
          got = _apply_layout(layout, keys, shape)
          if got is not _FALL_THROUGH:
            return got
          break
      if joined in embeddings or (
        len(shape) >= 2
        and param_tree.is_embedding_path(keys)
        and (base is None or dims is not None)
      ):
        return _embedding_dims(shape, self.embeddings)
      if self.head == "adamw" and param_tree.is_head_path(keys):
        return None
      if base is not None:
        return dims
      got = _apply_layout(self.default, keys, shape)
      return None if got is _FALL_THROUGH else got

    if base is None:
      return jax.tree_util.tree_map_with_path(rule, params, is_leaf=is_leaf)
    return jax.tree_util.tree_map_with_path(rule, params, base, is_leaf=is_leaf)


def dimension_rules(
  rules: Optional[Mapping[str, Layout]] = None,
  *,
  default: Layout = "auto",
  orientation: str = "in_out",
  embeddings: str = "spectral",
  head: str = "spectral",
) -> DimensionRules:
  """Says which leaves are matrices and how their axes are laid out, by rules.

  For models whose layout the default routing does not read: `(out, in)`
  weights (PyTorch-ported, Hugging Face `Conv1D`, custom Equinox modules),
  attention projections under any name, models whose embeddings and output
  head should go to AdamW.

  Examples:
    >>> import numpy as np
    >>> import htmuon_jax
    >>> params = {"embed_tokens": {"weight": np.zeros((100, 8))},
    ...           "q_proj": {"weight": np.zeros((16, 8))},
    ...           "norm": {"weight": np.zeros(8)},
    ...           "lm_head": {"weight": np.zeros((100, 8))}}
    >>> rules = htmuon_jax.dimension_rules(
    ...     orientation="out_in", embeddings="adamw", head="adamw")
    >>> for r in htmuon_jax.leaf_routes(params, rules):
    ...   print(r.path, r.branch, r.matrix_shape or r.reason)
    embed_tokens/weight adamw embedding
    lm_head/weight adamw output head
    norm/weight adamw 1-D
    q_proj/weight spectral (8, 16)

  Args:
    rules: `{regex: layout}`, checked in order against each leaf's
      `/`-joined path (`re.search`); the first that matches decides, unless
      its layout does not fit the leaf (then the leaf takes the default).
      A layout is `None` or `"adamw"` (not a matrix: AdamW), `"auto"` (the
      default below), a `MuonDimensionNumbers`, or the names of the leaf's
      trailing axes: `"in"` (fan-in), `"out"` (fan-out), `"window"` (conv
      window, fan-in) and `"batch"`, e.g. `"out in"` (PyTorch, Equinox and
      Hugging Face `Conv1D` weights), `"in out out"` (a `(d, heads,
      head_dim)` query kernel), `"out in window window"` (a PyTorch
      `Conv2d`). Leading axes not named (stacked layers) are batch axes. A
      named layout applies to leaves of at least that rank that are not
      biases or norm gains by name (`param_tree.is_non_matrix`); others take
      the default.
    default: what leaves that no rule decides get: `"auto"` (the default
      routing, as `muon_weight_dimension_numbers=None`, read with
      `orientation`), `"flax"` (`htmuon_jax.flax_dimension_numbers`), or
      a layout as above (`None`: only the rules' leaves are matrices).
    orientation: how the default routing reads 2-D weights found by name:
      `"in_out"` (Flax kernels, default) or `"out_in"` (PyTorch-style
      `weight`s). Equinox layers are read by their type either way.
    embeddings: embedding tables (Equinox `Embedding`s, and leaves named
      like `embedding`, `embed_tokens`, `word_embeddings`, `wte`, `wpe`) not
      decided by a rule: `"spectral"` (default: a matrix read vocab -> d,
      fan-in = vocab, the orientation every routing of this package uses),
      `"adamw"`, or `"authors"` (a matrix with fan-out = vocab, as the
      HTMuon authors' PyTorch code reads `nn.Embedding.weight`; shape factor
      `sqrt(vocab / d)`).
    head: the output head (weights of a module named `lm_head`, `head`,
      `classifier`, `unembed`, `logits`, `score`, `output_head`, or a
      top-level `output`) not decided by a rule: `"spectral"` (default, as
      the default routing) or `"adamw"`. A head tied to the embedding is the
      embedding.

  Returns:
    A `DimensionRules`, accepted wherever dimension numbers are.
  """
  checked = tuple(
    (str(p), _check_layout(v, f"dimension_rules: rule {p!r}"))
    for p, v in (rules or {}).items()
  )
  for pattern, _ in checked:
    re.compile(pattern)
  if default != "flax":
    default = _check_layout(default, "dimension_rules: default")
  if orientation not in ORIENTATIONS:
    raise ValueError(
      f"dimension_rules: orientation must be one of {ORIENTATIONS}, got "
      f"{orientation!r}."
    )
  if embeddings not in POLICIES:
    raise ValueError(
      f"dimension_rules: embeddings must be one of {POLICIES}, got "
      f"{embeddings!r}."
    )
  if head not in ("spectral", "adamw"):
    raise ValueError(
      f"dimension_rules: head must be 'spectral' or 'adamw', got {head!r}."
    )
  return DimensionRules(checked, default, orientation, embeddings, head)
