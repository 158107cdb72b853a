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

* `bias`, `scale` (norms), norms' `weight`s (by their module's name, see
  `param_tree.is_non_matrix`), and anything with fewer than 2 axes: `None`.
* `embedding` (`(vocab, d)`): a matrix read vocab -> d (fan-in = vocab), the
  one orientation of every routing here (`embeddings=False` sends it to
  AdamW, `embeddings="authors"` reads vocab as fan-out, as the HTMuon
  authors' PyTorch code).
* `kernel` with 2 axes: `(in, out)`; `head="adamw"` sends the output head's
  kernel to AdamW.
* `kernel` with more axes and a bias in its module: the bias has the shape
  of the output axes (`DenseGeneral`/`LinearGeneral`, attention, conv),
  whatever the module's name: a `q_proj` kernel `(d, heads, head_dim)` with
  bias `(heads, head_dim)` is one `d x (heads * head_dim)` matrix.
* without a bias: `(d, heads, head_dim)` for modules named like queries,
  keys or values (`query`, `key`, `value`, `q_proj`, `wq`, ...: fan-in `d`,
  fan-out `heads * head_dim`, as in PyTorch); otherwise (conv `(*window,
  in, out)`, attention output `(heads, head_dim, d)`) fan-out = last axis,
  fan-in = the rest, with a `UserWarning` for 3-axis kernels whose module
  name says neither attention output nor conv.

`overrides` (regular expressions on the `/`-joined path) settle anything else.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import jax
from optax.contrib import MuonDimensionNumbers
from optax.transforms import MaskedNode

from htmuon_jax import _param_tree as param_tree
from htmuon_jax._param_tree import infer_stacked_axes


Stacked = Union[None, int, str, Callable[[str], int]]


def _num_stacked(stacked: Stacked, path: str, inferred: int) -> int:
  if stacked is None:
    return inferred
  if isinstance(stacked, int):
    return stacked
  if isinstance(stacked, str):
    return 1 if re.search(stacked, path) else 0
  return int(stacked(path))


# Attention projections with heads axes, when their kernels carry no bias to
# read the output axes from: `(d, heads, head_dim)` (queries, keys, values)
# or `(heads, head_dim, d)` (the output projection).
QKV_MODULE = re.compile(
  r"^(query|key|value|q|k|v|qkv|kv|[qkv]_?proj|w[qkv]|to_[qkv]|c_attn)$",
  re.IGNORECASE,
)
OUT_MODULE = re.compile(
  r"^(out|o|o_proj|out_proj|wo|to_out|attn_out|proj)$", re.IGNORECASE
)
CONV_MODULE = re.compile(r"conv", re.IGNORECASE)


def _leaf_rule(
  keys: Sequence[str],
  shape: tuple[int, ...],
  names: Optional[tuple[Any, ...]],
  *,
  stacked: Stacked,
  inferred: int,
  stack_axis_names: Sequence[str],
  embeddings: str,
  head: str,
  bias: Optional[tuple[int, ...]] = None,
  unclear: Optional[list[str]] = None,
) -> Optional[MuonDimensionNumbers]:
  path = "/".join(keys)
  ndim = len(shape)
  batch = param_tree.stacked_axes(
    shape, names, stack_axis_names, _num_stacked(stacked, path, inferred)
  )
  core = [i for i in range(ndim) if i not in batch]
  name = keys[-1] if keys else ""
  parent = keys[-2] if len(keys) > 1 else ""
  if len(core) < 2 or param_tree.is_non_matrix(keys):
    return None
  if name == "embedding":
    if embeddings == "adamw" or len(core) != 2:
      return None
    vocab, d = core
    if embeddings == "authors":
      vocab, d = d, vocab
    return MuonDimensionNumbers(reduction_axis=vocab, output_axis=d)
  if name != "kernel":
    return None
  if head == "adamw" and param_tree.is_head_path(keys):
    return None
  out: list[int]
  core_shape = tuple(shape[i] for i in core)
  if (
    len(core) >= 3
    and bias is not None
    and 0 < len(bias) < len(core)
    and core_shape[len(core) - len(bias) :] == bias
  ):
    # `DenseGeneral`/`LinearGeneral`, attention, conv: the bias has the
    # shape of the output axes.
    out = core[len(core) - len(bias) :]
  elif len(core) >= 3 and QKV_MODULE.search(parent):
    out = core[1:]
  else:
    out = core[-1:]
    if (
      len(core) == 3
      and unclear is not None
      and not OUT_MODULE.search(parent)
      and not CONV_MODULE.search(parent)
    ):
      unclear.append(path)
  red = [i for i in core if i not in out]
  return MuonDimensionNumbers(
    reduction_axis=red[0] if len(red) == 1 else tuple(red),
    output_axis=out[0] if len(out) == 1 else tuple(out),
  )


def _policy(embeddings: Union[bool, str]) -> str:
  if embeddings is True:
    return "spectral"
  if embeddings is False:
    return "adamw"
  if embeddings not in ("spectral", "adamw", "authors"):
    raise ValueError(
      "flax_dimension_numbers: embeddings must be True/'spectral', "
      f"False/'adamw' or 'authors', got {embeddings!r}."
    )
  return str(embeddings)


def flax_dimension_numbers(
  params: Any,
  *,
  stacked: Stacked = None,
  stack_axis_names: Sequence[str] = ("layers",),
  embeddings: Union[bool, str] = True,
  head: str = "spectral",
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
    embeddings: `embedding` leaves `(vocab, d)`: `True` / `"spectral"`
      (default: a matrix read vocab -> d, fan-in = vocab, as the default
      routing and Equinox `Embedding`s), `False` / `"adamw"` (to AdamW, as
      common Muon setups), or `"authors"` (a matrix with fan-out = vocab, as
      the HTMuon authors' PyTorch code; shape factor `sqrt(vocab / d)`).
    head: `"spectral"` (default) or `"adamw"`: the kernel of the output
      head (a module named `lm_head`, `head`, `classifier`, `unembed`,
      `logits`, `score`, `output_head`, or a top-level `output`).
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
  policy = _policy(embeddings)
  if head not in ("spectral", "adamw"):
    raise ValueError(
      f"flax_dimension_numbers: head must be 'spectral' or 'adamw', got "
      f"{head!r}."
    )
  inferred = infer_stacked_axes(params) if stacked is None else None
  is_leaf = lambda x: param_tree.is_boxed(x) or isinstance(x, MaskedNode)
  biases = _bias_shapes(params, stacked, inferred, tuple(stack_axis_names))
  unclear: list[str] = []

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
      embeddings=policy,
      head=head,
      bias=biases.get(tuple(keys[:-1])),
      unclear=unclear,
    )

  if inferred is None:
    out = jax.tree_util.tree_map_with_path(rule, params, is_leaf=is_leaf)
  else:
    out = jax.tree_util.tree_map_with_path(
      rule, params, inferred, is_leaf=is_leaf
    )
  if unclear:
    warnings.warn(
      "flax_dimension_numbers: cannot tell the output axes of "
      f"{', '.join(unclear)} (3 axes, no bias, a name that is neither "
      "attention nor conv): read as (*fan_in, fan_out) with fan-out the "
      "last axis. A (d, heads, head_dim) projection wants overrides="
      "{path_regex: MuonDimensionNumbers(reduction_axis=0, output_axis=(1, "
      "2))}.",
      UserWarning,
      stacklevel=2,
    )
  return out


def _bias_shapes(
  params: Any,
  stacked: Stacked,
  inferred: Any,
  stack_axis_names: tuple[str, ...],
) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Each module's bias shape without its stacked axes, by module path."""
  is_leaf = lambda x: param_tree.is_boxed(x) or isinstance(x, MaskedNode)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0]
  counts = (
    jax.tree.leaves(inferred, is_leaf=lambda x: isinstance(x, MaskedNode))
    if inferred is not None
    else [None] * len(flat)
  )
  out = {}
  for (path, leaf), k in zip(flat, counts):
    keys = param_tree.leaf_keys(path)
    if isinstance(leaf, MaskedNode) or not keys or keys[-1] != "bias":
      continue
    shape = param_tree.leaf_shape(leaf)
    n = _num_stacked(stacked, "/".join(keys), k if isinstance(k, int) else 0)
    batch = param_tree.stacked_axes(
      shape, param_tree.axis_names(leaf), stack_axis_names, n
    )
    out[keys[:-1]] = tuple(d for i, d in enumerate(shape) if i not in batch)
  return out
