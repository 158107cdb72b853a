"""Dimension numbers for common Flax NNX / Linen parameter layouts.

`optax.contrib.muon`'s default (every 2-D leaf is a matrix) misroutes scanned
models: a stacked `(L, in, out)` kernel is 3-D (sent to AdamW) while a
stacked `(L, d)` norm scale is 2-D (sent to Muon). `flax_dimension_numbers`
builds the dimension-number tree from the parameter names and, when present,
the logical axis names that Flax attaches (`nnx.with_partitioning` /
`nn.with_partitioning`, and the `nnx.scan`/`nn.scan` axis added through
`transform_metadata={nnx.PARTITION_NAME: "layers"}` /
`metadata_params={nn.PARTITION_NAME: "layers"}`).

Stacked axes come from the logical axis names, from `stacked=`, or, by
default, are inferred from each module's stacked biases and norm scales
(`infer_stacked_axes`). Rules, per leaf, after removing the stacked axes
(batch axes of the result):

* `bias`, `scale` (norms), and anything with fewer than 2 axes: `None`.
* `embedding` (`(vocab, d)`): a matrix with fan-out = vocab, as the HTMuon
  authors' PyTorch layout `(vocab, d)` treats it (`embeddings=False` sends it
  to AdamW instead).
* `kernel` with 2 axes: `(in, out)`.
* `kernel` of `query` / `key` / `value` (`nnx.MultiHeadAttention`,
  `nn.MultiHeadDotProductAttention`: `(d, heads, head_dim)`): fan-in `d`,
  fan-out `heads * head_dim`, i.e. the full projection, as in PyTorch.
* any other `kernel` with more axes (conv `(*window, in, out)`, attention
  output `(heads, head_dim, d)`): fan-out = last axis, fan-in = the rest.

`overrides` (regular expressions on the `/`-joined path) settle anything else.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import jax
from optax.contrib import MuonDimensionNumbers
from optax.transforms import MaskedNode

from htmuon_jax import param_tree
from htmuon_jax.param_tree import infer_stacked_axes

__all__ = ["flax_dimension_numbers", "infer_stacked_axes"]

NON_MATRIX_NAMES = param_tree.NON_MATRIX_NAMES
QKV_NAMES = param_tree.QKV_NAMES
Stacked = Union[None, int, str, Callable[[str], int]]


def _num_stacked(stacked: Stacked, path: str, inferred: int) -> int:
  if stacked is None:
    return inferred
  if isinstance(stacked, int):
    return stacked
  if isinstance(stacked, str):
    return 1 if re.search(stacked, path) else 0
  return int(stacked(path))


def _leaf_rule(
  keys: Sequence[str],
  shape: tuple[int, ...],
  names: Optional[tuple[Any, ...]],
  *,
  stacked: Stacked,
  inferred: int,
  stack_axis_names: Sequence[str],
  embeddings: bool,
) -> Optional[MuonDimensionNumbers]:
  path = "/".join(keys)
  ndim = len(shape)
  batch = param_tree.stacked_axes(
    shape, names, stack_axis_names, _num_stacked(stacked, path, inferred)
  )
  core = [i for i in range(ndim) if i not in batch]
  name = keys[-1] if keys else ""
  parent = keys[-2] if len(keys) > 1 else ""
  if len(core) < 2 or name in NON_MATRIX_NAMES:
    return None
  if name == "embedding":
    if not embeddings or len(core) != 2:
      return None
    return MuonDimensionNumbers(reduction_axis=core[1], output_axis=core[0])
  if name != "kernel":
    return None
  if parent in QKV_NAMES and len(core) >= 3:
    return MuonDimensionNumbers(
      reduction_axis=core[0], output_axis=tuple(core[1:])
    )
  red = tuple(core[:-1])
  return MuonDimensionNumbers(
    reduction_axis=red[0] if len(red) == 1 else red, output_axis=core[-1]
  )


def flax_dimension_numbers(
  params: Any,
  *,
  stacked: Stacked = None,
  stack_axis_names: Sequence[str] = ("layers",),
  embeddings: bool = True,
  overrides: Optional[Mapping[str, Optional[MuonDimensionNumbers]]] = None,
) -> Any:
  """Dimension numbers for a Flax parameter tree (NNX state or Linen params).

  Use the result as `muon_weight_dimension_numbers` (aliases) or
  `weight_dimension_numbers` (transforms); or pass
  `functools.partial(flax_dimension_numbers, stacked=...)` itself, which is
  then called on the tree the optimizer sees (e.g. inside `nnx.Optimizer`).

  Args:
    params: `nnx.state(model, nnx.Param)`, Linen `variables["params"]` (boxed
      `nn.Partitioned` or plain arrays), or any such tree; `optax.MaskedNode`
      subtrees are kept.
    stacked: leading stacked (scan) axes of leaves without stack axis
      names: `None` (default) infers them from the stacked biases and norm
      scales of each module (see `infer_stacked_axes`), or an int for every
      leaf (`0`: nothing is stacked), a regular expression (leaves whose
      `/`-joined path matches have one stacked axis, e.g. `"^layers/"`), or a
      callable `path -> int`.
    stack_axis_names: logical axis names that mark a stacked axis (any
      position) on leaves that carry axis names.
    embeddings: whether `embedding` leaves are matrices (the HTMuon authors'
      choice) or go to AdamW (`False`).
    overrides: `{regex: MuonDimensionNumbers | None}` checked first, in
      order, against the `/`-joined path.

  Returns:
    A tree with the structure of `params` (Flax boxes as leaves) whose leaves
    are `MuonDimensionNumbers` or `None`, a prefix of the tree the optimizer
    sees.
  """
  if getattr(params, "ndim", None) == 0 and "int" in str(
    getattr(params, "dtype", "")
  ):
    # `optax.inject_hyperparams` calls every callable argument as a schedule
    # of the step count.
    raise TypeError(
      "flax_dimension_numbers was called with a scalar step count, not a "
      "parameter tree: optax.inject_hyperparams treats a callable "
      "muon_weight_dimension_numbers as a schedule. Pass "
      "static_args=('muon_weight_dimension_numbers',) to "
      "optax.inject_hyperparams, or pass the resolved tree "
      "flax_dimension_numbers(params)."
    )
  overrides = dict(overrides or {})
  inferred = infer_stacked_axes(params) if stacked is None else None

  def rule(path: Any, leaf: Any, inferred: Any = 0) -> Any:
    if isinstance(leaf, MaskedNode):
      return leaf
    keys = list(param_tree.leaf_keys(path))
    joined = "/".join(keys)
    for pattern, dims in overrides.items():
      if re.search(pattern, joined):
        return dims
    return _leaf_rule(
      keys,
      param_tree.leaf_shape(leaf),
      param_tree.axis_names(leaf),
      stacked=stacked,
      inferred=inferred,
      stack_axis_names=tuple(stack_axis_names),
      embeddings=embeddings,
    )

  is_leaf = lambda x: param_tree.is_boxed(x) or isinstance(x, MaskedNode)
  if inferred is None:
    return jax.tree_util.tree_map_with_path(rule, params, is_leaf=is_leaf)
  return jax.tree_util.tree_map_with_path(
    rule, params, inferred, is_leaf=is_leaf
  )
