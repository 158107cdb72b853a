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

__all__ = ["flax_dimension_numbers", "infer_stacked_axes"]

NON_MATRIX_NAMES = ("bias", "scale")
QKV_NAMES = ("query", "key", "value")
Stacked = Union[None, int, str, Callable[[str], int]]


def _is_boxed(x: Any) -> bool:
  """Flax containers that carry metadata: nnx.Variable, nn.Partitioned."""
  return hasattr(x, "get_metadata") or (
      hasattr(x, "names") and hasattr(x, "value") and hasattr(x, "unbox"))


def _axis_names(x: Any) -> Optional[tuple[Any, ...]]:
  """Logical axis names of a boxed leaf, if any."""
  names = getattr(x, "names", None)  # Linen nn.Partitioned.
  if names is None and hasattr(x, "get_metadata"):
    meta = x.get_metadata()
    names = meta.get("out_sharding", meta.get("sharding_names",
                                                meta.get("sharding")))
  if names is None or isinstance(names, jax.sharding.Sharding):
    return None
  return tuple(names)


def _shape(x: Any) -> tuple[int, ...]:
  if hasattr(x, "get_value"):  # nnx.Variable
    x = x.get_value()
  elif hasattr(x, "unbox"):  # Linen nn.Partitioned
    x = x.value
  return tuple(getattr(x, "shape", ()))


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _leaf_keys(path: Any) -> tuple[str, ...]:
  # `.value` entries appear when a tree is flattened through Flax boxes.
  return tuple(_key_name(k) for k in path
               if getattr(k, "name", None) != "value")


def _is_stack_witness(keys: Sequence[str], shape: tuple[int, ...]) -> bool:
  """A bias or norm scale with more than one axis: its module is stacked.

  Flax's biases and norm scales are 1-D, except the `(heads, head_dim)`
  biases of attention projections (`query`/`key`/`value`), which are
  therefore not witnesses.
  """
  if len(shape) < 2 or not keys or keys[-1] not in NON_MATRIX_NAMES:
    return False
  return len(keys) < 2 or keys[-2] not in QKV_NAMES


def infer_stacked_axes(params: Any) -> Any:
  """Leading stacked (scan / vmap) axes of each leaf, inferred from shapes.

  `nnx.scan`/`nnx.vmap`/`nn.scan` stack every leaf of the modules they
  create along a new leading axis. A stacked `(L, in, out)` kernel alone
  cannot be told from a conv1d or attention kernel, but its module's biases
  and norm scales can: Flax makes them 1-D, so a `bias`/`scale` leaf with
  `k + 1` axes witnesses `k` stacked axes of size `shape[:k]`. The stack is
  then the largest subtree around the witness whose leaves all share those
  leading sizes (and whose other biases/scales are at least as stacked); each
  of its leaves gets `k` stacked axes. Outside the witness's own module a
  leaf must keep two axes after the stack (a stacked kernel): a `(16, 24)`
  kernel next to a `(16, 24)` `scale` stays a matrix. Leaves with no witness
  get 0.

  A stacked module with neither biases nor norms has no witness: name its
  stacked axis (`transform_metadata={nnx.PARTITION_NAME: "layers"}`) or pass
  `flax_dimension_numbers(params, stacked=...)`. Conversely, an unstacked
  multi-axis bias outside attention (e.g. an `nnx.LinearGeneral` with
  `out_features=(h, d_h)`) is read as a stack only if every leaf of its
  module shares its leading size (kernel `(d, h, d_h)` with `d == h`); pass
  dimension numbers for such layers.

  Args:
    params: a parameter tree (arrays, Flax boxes, `optax.MaskedNode`s). Masked
      leaves carry no shape, so call it on the full tree.

  Returns:
    A tree with the structure of `params` of ints (`MaskedNode`s kept).
  """
  is_leaf = lambda x: _is_boxed(x) or isinstance(x, MaskedNode)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
  entries = [(_leaf_keys(path), None if isinstance(leaf, MaskedNode)
              else _shape(leaf)) for path, leaf in flat]
  counts = [0] * len(entries)
  for keys, shape in entries:
    if shape is None or not _is_stack_witness(keys, shape):
      continue
    k, lead = len(shape) - 1, shape[:len(shape) - 1]
    module = keys[:-1]

    def fits(ks: tuple[str, ...], sh: tuple[int, ...]) -> bool:
      # A stacked bias/scale keeps its own (feature) axis after the stack.
      is_vector = bool(ks) and ks[-1] in NON_MATRIX_NAMES
      if sh[:k] != lead or len(sh) <= k - 1 + is_vector:
        return False
      # A leaf of k + 1 axes would lose a matrix axis (a 2-D kernel read as
      # a stack of vectors): only the witness's own module may do that, so
      # a 2-D `scale` elsewhere in the tree cannot demote a sibling kernel.
      return is_vector or len(sh) != k + 1 or ks[:len(module)] == module

    for depth in range(len(module) + 1):  # The largest subtree first.
      members = [i for i, (ks, sh) in enumerate(entries)
                 if sh is not None and ks[:depth] == module[:depth]]
      if all(fits(*entries[i]) for i in members):
        for i in members:
          counts[i] = max(counts[i], k)
        break
  return treedef.unflatten([
      leaf if isinstance(leaf, MaskedNode) else c
      for (_, leaf), c in zip(flat, counts)])


def _stacked_axes(
    shape: tuple[int, ...], names: Optional[tuple[Any, ...]],
    stack_axis_names: Sequence[str], count: int,
) -> list[int]:
  """Axes with a stack axis name if there are any, else the leading `count`."""
  if names is not None and len(names) == len(shape):
    named = [i for i, n in enumerate(names) if n in stack_axis_names]
    if named:
      return named
  return list(range(min(count, len(shape))))


def _num_stacked(stacked: Stacked, path: str, inferred: int) -> int:
  if stacked is None:
    return inferred
  if isinstance(stacked, int):
    return stacked
  if isinstance(stacked, str):
    return 1 if re.search(stacked, path) else 0
  return int(stacked(path))


def _leaf_rule(
    keys: Sequence[str], shape: tuple[int, ...],
    names: Optional[tuple[Any, ...]], *, stacked: Stacked, inferred: int,
    stack_axis_names: Sequence[str], embeddings: bool,
) -> Optional[MuonDimensionNumbers]:
  path = "/".join(keys)
  ndim = len(shape)
  batch = _stacked_axes(shape, names, stack_axis_names,
                        _num_stacked(stacked, path, inferred))
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
    return MuonDimensionNumbers(reduction_axis=core[0],
                                output_axis=tuple(core[1:]))
  red = tuple(core[:-1])
  return MuonDimensionNumbers(
      reduction_axis=red[0] if len(red) == 1 else red, output_axis=core[-1])


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
  overrides = dict(overrides or {})
  inferred = infer_stacked_axes(params) if stacked is None else None

  def rule(path: Any, leaf: Any, inferred: Any = 0) -> Any:
    if isinstance(leaf, MaskedNode):
      return leaf
    keys = list(_leaf_keys(path))
    joined = "/".join(keys)
    for pattern, dims in overrides.items():
      if re.search(pattern, joined):
        return dims
    return _leaf_rule(
        keys, _shape(leaf), _axis_names(leaf), stacked=stacked,
        inferred=inferred, stack_axis_names=tuple(stack_axis_names),
        embeddings=embeddings)

  is_leaf = lambda x: _is_boxed(x) or isinstance(x, MaskedNode)
  if inferred is None:
    return jax.tree_util.tree_map_with_path(rule, params, is_leaf=is_leaf)
  return jax.tree_util.tree_map_with_path(rule, params, inferred,
                                          is_leaf=is_leaf)
