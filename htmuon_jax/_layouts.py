"""Which leaves are matrices, along which axes: the one routing engine.

Each leaf is routed once by `DimensionRules._route` (path rules, a default
reader, then the embedding and head policies), for the optimizer and for
`describe_routing`; Flax and Equinox are never imported. See docs/routing.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from optax.contrib import MuonDimensionNumbers
from optax.transforms import MaskedNode

WeightDimNumOrFn = Union[MuonDimensionNumbers, Any, Callable[[Any], Any], None]
Layout = Union[None, str, MuonDimensionNumbers]
Stacked = Union[None, int, str, Callable[[str], int]]
Dims = Optional[MuonDimensionNumbers]
Keys = tuple[str, ...]
Shape = tuple[int, ...]

# --- Names: the data the rules read ---------------------------------------

# Never matrices, whatever their rank (a scanned norm scale `(L, d)` is 2-D).
NON_MATRIX_NAMES = ("bias", "scale")
# A norm's gain or shift when its module is named like a norm (`norm1`,
# `ln_1`, `LayerNorm`, `input_layernorm`): Equinox, PyTorch, HF names.
NORM_LEAF_NAMES = ("weight", "gamma", "beta", "g")
NORM_MODULE = re.compile(r"norm|^ln(\d|_|$)", re.IGNORECASE)
# Embedding tables by their own or their module's name (`wte`, `wpe`: GPT-2).
EMBEDDING_NAME = re.compile(r"embed|^w[tp]e$", re.IGNORECASE)
# Output heads by module name; `output` only at the top (LLaMA).
HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "classifier", "unembed")
HEAD_NAMES += ("unembedding", "logits", "score", "output_head")
# Attention: `(heads, head_dim)` biases are no stack witnesses; bias-free
# kernels are `(d, heads, head_dim)` (QKV) or `(*fan_in, fan_out)`.
QKV_NAMES = ("query", "key", "value")
QKV_MODULE = re.compile(
  r"^(query|key|value|q|k|v|qkv|kv|[qkv]_?proj|w[qkv]|to_[qkv]|c_attn)$",
  re.IGNORECASE,
)
OUT_MODULE = re.compile(
  r"^(out|o|o_proj|out_proj|wo|to_out|attn_out|proj)$", re.IGNORECASE
)
CONV_MODULE = re.compile(r"conv", re.IGNORECASE)
# Logical axis names (Flax partitioning metadata) of a stacked axis.
STACK_AXIS_NAMES = ("layers",)
# Equinox layers read by type (norms are never matrices).
EQX_LAYERS: tuple[str, ...] = ("Linear", "Conv", "Embedding", "LayerNorm")
EQX_LAYERS += ("RMSNorm", "GroupNorm", "BatchNorm")
POLICIES, HEADS = ("spectral", "adamw", "authors"), ("spectral", "adamw")
ORIENTATIONS = ("in_out", "out_in")


def _is_non_matrix(keys: Sequence[str]) -> bool:
  """A bias, a Flax norm `scale`, or a norm's `weight` (by its module)."""
  if keys and keys[-1] in NON_MATRIX_NAMES:
    return True
  norm = len(keys) > 1 and bool(NORM_MODULE.search(keys[-2]))
  return norm and keys[-1] in NORM_LEAF_NAMES


def _is_embedding_path(keys: Keys) -> bool:
  named = any(EMBEDDING_NAME.search(k) for k in keys[-2:])
  return named and not _is_non_matrix(keys)


def _is_head_path(keys: Keys) -> bool:
  parent = keys[-2].lower() if len(keys) > 1 else ""
  top = len(keys) == 2 and parent == "output"
  return (parent in HEAD_NAMES or top) and not _is_non_matrix(keys)


# --- Leaves and dimension-number trees ------------------------------------


def _is_boxed(x: Any) -> bool:
  """Flax containers with metadata: `nnx.Variable`, `nn.Partitioned`."""
  linen = all(hasattr(x, a) for a in ("names", "value", "unbox"))
  return hasattr(x, "get_metadata") or linen


def _is_param_leaf(x: Any) -> bool:
  return _is_boxed(x) or isinstance(x, MaskedNode)


def _axis_names(x: Any) -> tuple[Any, ...]:
  """Logical axis names of a boxed leaf (`()` if none)."""
  names = getattr(x, "names", None)  # Linen nn.Partitioned
  if names is None and hasattr(x, "get_metadata"):
    meta = x.get_metadata()
    names = meta.get(
      "out_sharding", meta.get("sharding_names", meta.get("sharding"))
    )
  is_sharding = isinstance(names, jax.sharding.Sharding)
  return () if names is None or is_sharding else tuple(names)


def _shape(x: Any) -> Shape:
  if hasattr(x, "get_value"):  # nnx.Variable
    x = x.get_value()
  elif hasattr(x, "unbox"):  # Linen nn.Partitioned
    x = x.value
  return tuple(int(n) for n in getattr(x, "shape", ()))


def _keys(path: Any) -> Keys:
  """Path entries as strings, without the `.value` of a Flax box."""
  keys = []
  for e in path:
    if getattr(e, "name", None) != "value":
      attr = next((a for a in ("key", "name", "idx") if hasattr(e, a)), None)
      keys.append(str(e if attr is None else getattr(e, attr)))
  return tuple(keys)


def is_dimension_numbers(x: Any) -> bool:
  return isinstance(x, MuonDimensionNumbers)


def is_dim_leaf(x: Any) -> bool:
  """A leaf of a dimension-number tree (`MaskedNode`: `optax.partition`'s)."""
  return x is None or is_dimension_numbers(x) or isinstance(x, MaskedNode)


def is_dimension_function(x: Any) -> bool:
  """A callable to call on the params, not a callable pytree (Equinox)."""
  if not callable(x) or is_dimension_numbers(x):
    return False
  if isinstance(x, jax.tree_util.Partial):
    return True
  tree = jax.tree.structure(x, is_leaf=is_dim_leaf)
  return jax.tree_util.treedef_is_leaf(tree)


def map_with_dimension_numbers(
  fn: Callable[..., Any], dim_tree: Any, tree: Any, *rest: Any
) -> Any:
  """`jax.tree.map(fn, dim, leaf, *rest)`; `fn` never sees a `MaskedNode`."""
  is_leaf = lambda x: x is None or is_dimension_numbers(x)
  return jax.tree.map(fn, dim_tree, tree, *rest, is_leaf=is_leaf)


# --- Matrices: (batch, fan_in, fan_out) views of a leaf -------------------


def _matrix(red: Sequence[int], out: Sequence[int]) -> MuonDimensionNumbers:
  return MuonDimensionNumbers(
    reduction_axis=red[0] if len(red) == 1 else tuple(red),
    output_axis=out[0] if len(out) == 1 else tuple(out),
  )


def _axes(shape: Shape, dims: MuonDimensionNumbers) -> tuple[Shape, Shape]:
  """The reduction and output axes, checked (user numbers meet shapes here)."""
  ndim, where = len(shape), "weight_dimension_numbers:"
  if ndim < 2:
    raise ValueError(
      f"{where} a spectral method needs a matrix, but a parameter of shape "
      f"{shape} was given {dims}. Map non-matrix leaves to None."
    )
  red, out = ((v,) if isinstance(v, int) else tuple(v) for v in dims)
  for name, ax in [(n, a) for n, v in zip(dims._fields, (red, out)) for a in v]:
    if not -ndim <= ax < ndim:
      raise ValueError(
        f"{where} {name}={ax} is out of range for a parameter of rank {ndim}."
      )
  red, out = tuple(a % ndim for a in red), tuple(a % ndim for a in out)
  if not red or not out:
    raise ValueError(
      f"{where} reduction_axis and output_axis must each name at least one "
      f"axis, got {dims}."
    )
  if set(red) & set(out):
    raise ValueError(
      f"{where} reduction_axis and output_axis must be disjoint, got {dims} "
      f"for a parameter of rank {ndim}."
    )
  return red, out


def fan_in_fan_out(shape: Shape, dims: MuonDimensionNumbers) -> tuple[int, int]:
  """Products of the reduction (fan-in) and output (fan-out) axis sizes."""
  red, out = _axes(shape, dims)
  return math.prod(shape[a] for a in red), math.prod(shape[a] for a in out)


def _perm(shape: Shape, dims: MuonDimensionNumbers) -> tuple[Shape, Shape]:
  red, out = _axes(shape, dims)
  batch = tuple(a for a in range(len(shape)) if a not in red + out)
  size = lambda axes: math.prod(shape[a] for a in axes)
  return batch + red + out, (size(batch), size(red), size(out))


def to_matrices(x: jax.Array, dims: MuonDimensionNumbers) -> jax.Array:
  """Reshapes `x` to a `(batch, fan_in, fan_out)` stack of matrices."""
  perm, flat = _perm(x.shape, dims)
  return jnp.transpose(x, perm).reshape(flat)


def from_matrices(
  m: jax.Array, dims: MuonDimensionNumbers, shape: Shape
) -> jax.Array:
  """Inverse of `to_matrices` for a parameter of the given `shape`."""
  perm, _ = _perm(shape, dims)
  inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
  return jnp.transpose(m.reshape([shape[a] for a in perm]), inverse)


# --- Stacks: scanned / vmapped layers, found by one helper ---------------


def _stack_counts(entries: list[tuple[Keys, Any]]) -> list[int]:
  """Stacked leading axes per `(keys, shape)` entry (`shape` None: masked)."""
  counts = [0] * len(entries)
  shaped = [(i, ks) for i, (ks, s) in enumerate(entries) if s is not None]
  for keys, shape in entries:
    # Witness: a bias or norm scale of 2+ axes, not an attention bias.
    if shape is None or len(shape) < 2 or not _is_non_matrix(keys):
      continue
    if len(keys) > 1 and keys[-2] in QKV_NAMES:
      continue
    k, lead, module = len(shape) - 1, shape[:-1], keys[:-1]
    for depth in range(len(module) + 1):  # The largest subtree first.
      members = [i for i, ks in shaped if ks[:depth] == module[:depth]]
      if all(_shares_stack(*entries[i], k, lead, module) for i in members):
        for i in members:
          counts[i] = max(counts[i], k)
        break
  return counts


def _shares_stack(
  keys: Keys, shape: Shape, k: int, lead: Shape, module: Keys
) -> bool:
  # A stacked bias/scale keeps its feature axis; a leaf of k + 1 axes would
  # lose a matrix axis, which only the witness's own module may (a 2-D
  # `scale` elsewhere must not demote a sibling kernel).
  vector = _is_non_matrix(keys)
  if shape[:k] != lead or len(shape) <= k - 1 + vector:
    return False
  return vector or len(shape) != k + 1 or keys[: len(module)] == module


def _entries(flat: list[Any]) -> list[tuple[Keys, Any]]:
  masked = lambda x: isinstance(x, MaskedNode)
  return [(_keys(p), None if masked(x) else _shape(x)) for p, x in flat]


def infer_stacked_axes(params: Any) -> Any:
  """Leading stacked (scan / vmap) axes of each leaf, inferred from shapes.

  A bias or norm scale with `k + 1` axes (not an attention `(heads,
  head_dim)` bias) witnesses `k` stacked axes; every leaf of the largest
  subtree around it that shares those leading sizes is stacked (outside the
  witness's module, only leaves that keep two axes after the stack). A stack
  with neither biases nor norms has no witness: name its axis `"layers"`.

  Args:
    params: a parameter tree (arrays, Flax boxes, `optax.MaskedNode`s); masked
      leaves carry no shape, so pass the full tree.

  Returns:
    A tree with the structure of `params` of ints (`MaskedNode`s kept).
  """
  flat, treedef = _flatten(params)
  counts = _stack_counts(_entries(flat))
  return treedef.unflatten(  # type: ignore[attr-defined]
    [x if isinstance(x, MaskedNode) else c for (_, x), c in zip(flat, counts)]
  )


def _flatten(params: Any) -> tuple[list[Any], Any]:
  """`(path, leaf)`s with Flax boxes and `MaskedNode`s as leaves."""
  return jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_param_leaf)


# --- Equinox layers by type (found in sys.modules, never imported) --------


def _eqx_nn() -> Any:
  eqx = sys.modules.get("equinox")
  return None if eqx is None else eqx.nn


def _is_eqx_layer(x: Any) -> bool:
  nn = _eqx_nn()
  kinds = tuple(getattr(nn, n) for n in EQX_LAYERS if hasattr(nn, n))
  return nn is not None and isinstance(x, kinds)


def _eqx_owners(params: Any, n: int) -> list[Any]:
  """The Equinox layer holding each of the `n` parameter leaves, or None."""
  if _eqx_nn() is None:
    return [None] * n
  owners: list[Any] = []
  is_leaf = lambda x: _is_eqx_layer(x) or _is_param_leaf(x)
  for node in jax.tree.leaves(params, is_leaf=is_leaf):
    size = len(jax.tree.leaves(node, is_leaf=_is_param_leaf))
    owners += [node if _is_eqx_layer(node) else None] * max(size, 1)
  return owners


def _eqx_dims(layer: Any, keys: Keys, ndim: int) -> Dims:
  """Equinox's `Linear` `(out, in)`, `Conv` `(out, in, *window)` and
  `Embedding` `(vocab, d)` weights; extra leading axes are a stack."""
  nn = _eqx_nn()
  if not keys or keys[-1] != "weight":
    return None
  if isinstance(layer, nn.Linear) and ndim >= 2:
    scalar = "scalar" in (layer.in_features, layer.out_features)
    return None if scalar else _matrix([ndim - 1], [ndim - 2])
  if isinstance(layer, nn.Conv):
    s = ndim - 2 - layer.num_spatial_dims  # stacked axes
    return None if s < 0 else _matrix(list(range(s + 1, ndim)), [s])
  if isinstance(layer, nn.Embedding):
    return _matrix([ndim - 2], [ndim - 1])
  return None


# --- The engine -----------------------------------------------------------


class _Leaf(NamedTuple):
  keys: Keys
  shape: Shape
  core: list[int]  # the axes that are not stacked
  layer: Any  # the Equinox layer holding the leaf, or None


def _axis_spec(layout: str) -> Optional[tuple[str, ...]]:
  """`"out in"`, `"(out, in)"`, `"out_in"`, `"out in window window"`, ..."""
  words = re.sub(r"[(),_]", " ", layout).split()
  tokens = {"in": "in", "window": "in", "out": "out", "batch": "batch"}
  if words and all(w in tokens for w in words):
    return tuple(tokens[w] for w in words)
  return None


def _check_layout(layout: Any, where: str) -> Layout:
  if layout is None or is_dimension_numbers(layout):
    return layout
  if isinstance(layout, str):
    spec = _axis_spec(layout)
    if layout in ("auto", "adamw") or (spec and {"in", "out"} <= set(spec)):
      return layout
  raise ValueError(
    f"{where}: a layout is None or 'adamw' (not a matrix), 'auto' (the "
    "default routing), a MuonDimensionNumbers, or axis names of the "
    "trailing axes, 'in', 'out', 'window' (fan-in) and 'batch', e.g. "
    f"'out in' or 'out in window window'; got {layout!r}."
  )


_FALL_THROUGH = object()  # a layout that leaves the leaf to the default


def _apply_layout(layout: Layout, leaf: _Leaf) -> Any:
  """The dimension numbers a layout gives a leaf, or `_FALL_THROUGH`."""
  if layout is None or layout == "adamw" or is_dimension_numbers(layout):
    return None if layout == "adamw" else layout
  spec = None if layout == "auto" else _axis_spec(str(layout))
  offset = len(leaf.shape) - len(spec or ())
  if spec is None or offset < 0 or _is_non_matrix(leaf.keys):
    return _FALL_THROUGH  # "auto", biases, norm gains, too low a rank
  pick = lambda t: [offset + i for i, s in enumerate(spec) if s == t]
  return _matrix(pick("in"), pick("out"))


def _auto(leaf: _Leaf, orientation: str) -> Dims:
  """The default reader: Equinox layers by type, else 2-D once unstacked."""
  if leaf.layer is not None:
    return _eqx_dims(leaf.layer, leaf.keys, len(leaf.shape))
  if len(leaf.core) != 2 or _is_non_matrix(leaf.keys):
    return None
  red, out = leaf.core[:: -1 if orientation == "out_in" else 1]
  return _matrix([red], [out])


def _flax(leaf: _Leaf, bias: Optional[Shape], unclear: list[str]) -> Dims:
  """Flax names: `embedding` and `kernel`s (see `flax_dimension_numbers`)."""
  keys, core, name = leaf.keys, leaf.core, (leaf.keys or ("",))[-1]
  if (
    len(core) < 2 or _is_non_matrix(keys) or name not in ("kernel", "embedding")
  ):
    return None
  if name == "embedding":
    return _matrix(core[:1], core[1:]) if len(core) == 2 else None
  parent, n = keys[-2] if len(keys) > 1 else "", len(bias or ())
  by_bias = 0 < n < len(core) and bias == tuple(
    leaf.shape[i] for i in core[-n:]
  )
  if len(core) >= 3 and by_bias:
    out = core[-n:]
  elif len(core) >= 3 and QKV_MODULE.search(parent):
    out = core[1:]
  else:
    out = core[-1:]
    named = OUT_MODULE.search(parent) or CONV_MODULE.search(parent)
    if len(core) == 3 and not named:
      unclear.append("/".join(keys))
  return _matrix([i for i in core if i not in out], out)


def _why_not(keys: Keys, shape: Shape) -> str:
  """Why the default reader takes a leaf for no matrix."""
  if len(shape) >= 2 and keys and keys[-1] in NON_MATRIX_NAMES:
    return f"named {keys[-1]!r}"
  if len(shape) >= 2 and _is_non_matrix(keys):
    return "norm weight"
  return f"{len(shape)}-D" if shape else "scalar"


@dataclasses.dataclass(frozen=True)
class DimensionRules:
  """Which leaves are matrices, and their axes, by rules on leaf paths.

  Built by `dimension_rules` (and `flax_dimension_numbers`); pass it as
  `muon_weight_dimension_numbers` or `weight_dimension_numbers`. A value,
  not a callable (`optax.inject_hyperparams` passes it through).
  """

  rules: Any = ()  # `{regex: layout}`, kept as pairs
  default: Layout = "auto"
  orientation: str = "in_out"
  embeddings: str = "spectral"
  head: str = "spectral"
  stacked: Stacked = None
  stack_axis_names: Sequence[str] = STACK_AXIS_NAMES
  where: dataclasses.InitVar[str] = "dimension_rules"

  def __post_init__(self, where: str) -> None:
    # Every check of a routing, once, here.
    pairs = dict(self.rules or {}).items()
    rules = tuple(
      (str(p), _check_layout(v, f"{where}: rule {p!r}")) for p, v in pairs
    )
    for pattern, _ in rules:
      re.compile(pattern)
    if self.default != "flax":
      _check_layout(self.default, f"{where}: default")
    checks = zip(
      ("orientation", "embeddings", "head"), (ORIENTATIONS, POLICIES, HEADS)
    )
    for name, choices in checks:
      if (got := getattr(self, name)) not in choices:
        raise ValueError(
          f"{where}: {name} must be one of {choices}, got {got!r}."
        )
    object.__setattr__(self, "rules", rules)
    object.__setattr__(self, "stack_axis_names", tuple(self.stack_axis_names))

  def _leaf(
    self, x: Any, keys: Keys, shape: Shape, k: int, layer: Any
  ) -> _Leaf:
    """A leaf's axes but its stacked ones (named, else `k` or `stacked=`)."""
    names = _axis_names(x) if _is_boxed(x) else ()
    stack = [i for i, n in enumerate(names) if n in self.stack_axis_names]
    if not stack or len(names) != len(shape):
      stack = list(range(_num_stacked(self.stacked, "/".join(keys), k)))
    core = [i for i in range(len(shape)) if i not in stack]
    return _Leaf(keys, shape, core, layer)

  def _routes(
    self, params: Any
  ) -> tuple[list[Any], Any, list[tuple[Any, str]]]:
    """The one evaluation: `params`' `(path, leaf)`s, its treedef, and each
    leaf's `(dims, reason)` (`(MaskedNode, "")` for masked leaves)."""
    flat, treedef = _flatten(params)
    entries = _entries(flat)
    ks = _stack_counts(entries) if self.stacked is None else [0] * len(flat)
    owners = _eqx_owners(params, len(flat))
    leaves = [
      None if shape is None else self._leaf(x, keys, shape, k, layer)
      for (_, x), (keys, shape), k, layer in zip(flat, entries, ks, owners)
    ]
    biases = {
      lf.keys[:-1]: tuple(lf.shape[i] for i in lf.core)
      for lf in leaves
      if lf and lf.keys[-1:] == ("bias",)
    }
    unclear: list[str] = []
    routes = [
      (x, "") if lf is None else self._route(lf, biases, unclear)
      for (_, x), lf in zip(flat, leaves)
    ]
    if unclear:
      warnings.warn(
        "flax_dimension_numbers: cannot tell the output axes of "
        f"{', '.join(unclear)} (3 axes, no bias, a name that is neither "
        "attention nor conv): read as (*fan_in, fan_out) with fan-out the "
        "last axis. A (d, heads, head_dim) projection wants overrides="
        "{path_regex: MuonDimensionNumbers(reduction_axis=0, output_axis=(1, "
        "2))}.",
        UserWarning,
        stacklevel=4,
      )
    return flat, treedef, routes

  def _route(
    self, leaf: _Leaf, biases: dict, unclear: list[str]
  ) -> tuple[Dims, str]:
    """One leaf: path rules, the default reader, then the policies."""
    keys, shape = leaf.keys, leaf.shape
    for pattern, layout in self.rules:
      if re.search(pattern, "/".join(keys)):
        dims = _apply_layout(layout, leaf)
        if dims is not _FALL_THROUGH:
          return dims, "" if dims is not None else f"rule {pattern!r}"
        break
    if self.default == "auto":
      dims = _auto(leaf, self.orientation)
    elif self.default == "flax":
      dims = _flax(leaf, biases.get(keys[:-1]), unclear)
    elif (dims := _apply_layout(self.default, leaf)) is _FALL_THROUGH:
      dims = None
    # Embeddings: Equinox `Embedding`s by type, other leaves by name where
    # the reader takes them for one matrix (or the default is a layout).
    # One policy, one orientation (vocab -> d).
    nn = _eqx_nn() if leaf.layer is not None else None
    if nn is not None:
      table = isinstance(leaf.layer, nn.Embedding) and keys[-1] == "weight"
    else:
      matrix = dims is not None and all(isinstance(a, int) for a in dims)
      read = matrix or self.default not in ("auto", "flax")
      table = len(shape) >= 2 and read and _is_embedding_path(keys)
    if table:
      if self.embeddings == "adamw":
        return None, "embedding"
      vocab, d = len(shape) - 2, len(shape) - 1  # stacked axes lead
      if self.embeddings == "authors":  # PyTorch's `(vocab, d)` as `(out, in)`
        vocab, d = d, vocab
      return _matrix([vocab], [d]), ""
    if self.head == "adamw" and len(shape) >= 2 and _is_head_path(keys):
      return None, "output head"
    return dims, "" if dims is not None else _why_not(keys, shape)

  def resolve(self, params: Any) -> Any:
    """The dimension-number tree of `params` (structure of `params`)."""
    _, treedef, routes = self._routes(params)
    return treedef.unflatten([dims for dims, _ in routes])


def _num_stacked(stacked: Stacked, path: str, inferred: int) -> int:
  if stacked is None or isinstance(stacked, int):
    return inferred if stacked is None else stacked
  if isinstance(stacked, str):
    return int(bool(re.search(stacked, path)))
  return int(stacked(path))


# The default routing: `weight_dimension_numbers=None`.
DEFAULT = DimensionRules()


# --- The public entry points ----------------------------------------------


def dimension_rules(
  rules: Optional[Mapping[str, Layout]] = None,
  *,
  default: Layout = "auto",
  orientation: str = "in_out",
  embeddings: str = "spectral",
  head: str = "spectral",
) -> DimensionRules:
  """Says which leaves are matrices and how their axes are laid out, by rules.

  For `(out, in)` weights (PyTorch-ported, Hugging Face `Conv1D`, custom
  Equinox modules), projections under any name, and embeddings or heads to
  AdamW; docs/routing.md has examples.

  Args:
    rules: `{regex: layout}` on the `/`-joined leaf path (`re.search`), in
      order; the first match decides unless its layout does not fit the
      leaf. A layout is `None`/`"adamw"` (AdamW), `"auto"` (the default), a
      `MuonDimensionNumbers`, or names of the trailing axes: `"in"`,
      `"window"` (fan-in), `"out"` (fan-out), `"batch"`, e.g. `"out in"`,
      `"in out out"`, `"out in window window"`; unnamed leading axes are
      batch axes, and named layouts skip biases, norm gains and leaves of
      lower rank.
    default: for leaves no rule decides: `"auto"` (the default routing),
      `"flax"` (`flax_dimension_numbers`) or a layout.
    orientation: how the default routing reads 2-D weights found by name:
      `"in_out"` (Flax) or `"out_in"` (PyTorch); Equinox layers go by type.
    embeddings: embedding tables (by Equinox type or by name):
      `"spectral"` (a matrix read vocab -> d), `"adamw"`, or `"authors"`
      (fan-out = vocab, as the HTMuon authors' PyTorch code).
    head: the output head (`lm_head`, `head`, `classifier`, ...):
      `"spectral"` or `"adamw"`.

  Returns:
    A `DimensionRules`, accepted wherever dimension numbers are.
  """
  return DimensionRules(rules, default, orientation, embeddings, head)


def flax_dimension_numbers(
  params: Any,
  *,
  stacked: Stacked = None,
  stack_axis_names: Sequence[str] = STACK_AXIS_NAMES,
  embeddings: Union[bool, str] = True,
  head: str = "spectral",
  overrides: Optional[Mapping[str, Dims]] = None,
) -> Any:
  """Dimension numbers for a Flax parameter tree (NNX state or Linen params).

  Reads Flax names once the stacked axes are set aside: `embedding`s and
  `kernel`s are matrices, a kernel's output axes are its module's bias's,
  else read from its name (docs/routing.md). Pass the function itself (or
  a `functools.partial`) to have it called on the tree the optimizer sees.

  Args:
    params: an NNX state, Linen params (boxed or not), or any such tree.
    stacked: stacked leading axes of leaves without stack axis names: `None`
      (inferred, `infer_stacked_axes`), an int, a regex on the path (one
      stacked axis, e.g. `"^layers/"`) or a callable `path -> int`.
    stack_axis_names: logical axis names that mark a stacked axis.
    embeddings: as in `dimension_rules` (`True`: spectral, `False`: adamw).
    head: as in `dimension_rules`.
    overrides: `{regex: MuonDimensionNumbers | None}`, checked first.

  Returns:
    A tree of `MuonDimensionNumbers | None`, the structure of `params`.
  """
  if getattr(params, "ndim", None) == 0 and "int" in str(
    getattr(params, "dtype", "")
  ):
    # `optax.inject_hyperparams` calls every callable argument as a schedule.
    raise TypeError(
      "flax_dimension_numbers was called with a scalar step count, not a "
      "parameter tree: optax.inject_hyperparams treats a callable "
      "muon_weight_dimension_numbers as a schedule. Pass "
      "static_args=('muon_weight_dimension_numbers',) to "
      "optax.inject_hyperparams, or pass the resolved tree "
      "flax_dimension_numbers(params)."
    )
  policy = embeddings if isinstance(embeddings, str) else "adamw"
  policy = "spectral" if embeddings is True else policy
  names, where = stack_axis_names, "flax_dimension_numbers"
  rules = DimensionRules(
    overrides, "flax", "in_out", policy, head, stacked, names, where
  )
  return rules.resolve(params)


def resolve_dimension_numbers(
  weight_dimension_numbers: WeightDimNumOrFn, params: Any
) -> Any:
  """Expands user dimension numbers into a tree with one entry per leaf.

  Args:
    weight_dimension_numbers: `None` (the default routing), a
      `dimension_rules(...)`, a `MuonDimensionNumbers` for every leaf, a
      prefix tree of `MuonDimensionNumbers | None`, or a callable returning
      one of these from `params`.
    params: the parameter (or update) tree; `optax.MaskedNode`s are kept.

  Returns:
    A tree with the structure of `params` of `MuonDimensionNumbers | None`.
  """
  dims = weight_dimension_numbers
  if is_dimension_function(dims):
    dims = dims(params)  # type: ignore[misc]
  if dims is None or isinstance(dims, DimensionRules):
    return (dims or DEFAULT).resolve(params)
  if is_dimension_numbers(dims):
    return jax.tree.map(lambda _: dims, params)
  fill = lambda d, sub: jax.tree.map(lambda _: d, sub)
  broadcast = lambda d, sub: sub if isinstance(d, MaskedNode) else fill(d, sub)
  try:
    return jax.tree.map(broadcast, dims, params, is_leaf=is_dim_leaf)
  except ValueError as e:
    raise ValueError(
      "weight_dimension_numbers must be None, a MuonDimensionNumbers, a "
      "prefix tree of the params or a callable returning one; its structure "
      f"does not match the params: {e}"
    ) from e


# --- Reports: where each leaf goes, in words ------------------------------


class LeafRoute(NamedTuple):
  """Where one parameter leaf goes.

  Attributes:
    path: the leaf's `/`-joined key path.
    shape: the leaf's shape.
    branch: `"spectral"` or `"adamw"`.
    dimension_numbers: its `MuonDimensionNumbers` (`None` for AdamW).
    num_matrices: matrices the spectral branch sees (0 for AdamW).
    matrix_shape: `(fan_in, fan_out)` of each matrix (`None` for AdamW).
    reason: why AdamW: its rank (`"1-D"`, `"4-D"`), `"named 'scale'"`,
      `"norm weight"`, `"embedding"`, `"output head"`, `"rule '...'"`.
  """

  path: str
  shape: Shape
  branch: str
  dimension_numbers: Dims
  num_matrices: int
  matrix_shape: Optional[tuple[int, int]]
  reason: str


def leaf_routes(
  params: Any, weight_dimension_numbers: WeightDimNumOrFn = None
) -> list[LeafRoute]:
  """The route of every leaf of `params`, in tree order.

  For `None` and `dimension_rules`, the optimizer's own evaluation (and its
  reasons); other dimension numbers explain AdamW leaves by their rank.

  Args:
    params: the parameter tree the optimizer sees (dicts, an NNX `State`,
      Linen params, boxed or not, Equinox trees).
    weight_dimension_numbers: as the aliases' `muon_weight_dimension_numbers`.

  Returns:
    One `LeafRoute` per array leaf.
  """
  dims = weight_dimension_numbers
  if dims is None or isinstance(dims, DimensionRules):
    flat, _, routes = (dims or DEFAULT)._routes(params)
  else:
    tree = resolve_dimension_numbers(dims, params)
    dim_leaves = jax.tree.leaves(tree, is_leaf=is_dim_leaf)
    # `None` leaves (an `eqx.filter`ed model) line up with the dims' `None`s.
    is_leaf = lambda x: x is None or _is_param_leaf(x)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0]
    if len(dim_leaves) != len(flat):
      raise ValueError(
        f"weight_dimension_numbers: resolved to {len(dim_leaves)} entries "
        f"for {len(flat)} parameter leaves."
      )
    routes = [
      (d, _why_not((), _shape(x))) for d, (_, x) in zip(dim_leaves, flat)
    ]
  out = []
  for (path, x), (d, reason) in zip(flat, routes):
    if x is None or isinstance(x, MaskedNode):
      continue
    shape = _shape(x)
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if d is None:
      out.append(LeafRoute(name, shape, "adamw", None, 0, None, reason))
      continue
    fan_in, fan_out = fan_in_fan_out(shape, d)
    n = math.prod(shape) // max(1, fan_in * fan_out)
    out.append(LeafRoute(name, shape, "spectral", d, n, (fan_in, fan_out), ""))
  return out


def _summary(routes: list[LeafRoute], default: bool) -> str:
  count = lambda n, one, many: f"{n} {one if n == 1 else many}"
  spectral = [r for r in routes if r.branch == "spectral"]
  adamw = [r for r in routes if r.branch == "adamw"]
  matrices = count(sum(r.num_matrices for r in spectral), "matrix", "matrices")
  line = (
    f"routing: {matrices} in {count(len(spectral), 'leaf', 'leaves')} to the "
    f"spectral branch, {count(len(adamw), 'leaf', 'leaves')} to AdamW"
  )
  if not adamw:
    return line
  reasons = dict.fromkeys(r.reason for r in adamw)  # in order of appearance
  line += " (" + ", ".join(
    f"{k}: {[r.reason for r in adamw].count(k)}" for k in reasons
  )
  line += ")" if default else "; as weight_dimension_numbers says)"
  # Leaves of 3+ dims in AdamW are the ones a user may not expect: name them.
  big = [r for r in adamw if len(r.shape) >= 3]
  if big:
    line += f"; {len(big)} of 3+ dims in AdamW: "
    line += ", ".join(f"{r.path} {r.shape}" for r in big[:3])
    line += f" and {len(big) - 3} more" if len(big) > 3 else ""
    if default:
      line += (
        " (the default routing takes 2-D leaves and scanned stacks of "
        "them; pass weight_dimension_numbers, e.g. "
        "htmuon_jax.flax_dimension_numbers, to make them matrices)"
      )
  return line


def describe_routing(
  params: Any,
  weight_dimension_numbers: WeightDimNumOrFn = None,
  *,
  summary: bool = False,
) -> str:
  """Says which leaves go to the spectral branch (as which matrices) and which
  to AdamW (and why).

  Examples:
    >>> import numpy as np
    >>> import htmuon_jax
    >>> params = {"conv": {"kernel": np.zeros((3, 3, 4, 8))},
    ...           "dense": {"kernel": np.zeros((8, 10)), "bias": np.zeros(10)}}
    >>> print(htmuon_jax.describe_routing(params, summary=True))
    ... # doctest: +NORMALIZE_WHITESPACE
    routing: 1 matrix in 1 leaf to the spectral branch, 2 leaves to AdamW
    (4-D: 1, 1-D: 1); 1 of 3+ dims in AdamW: conv/kernel (3, 3, 4, 8) (the
    default routing takes 2-D leaves and scanned stacks of them; pass
    weight_dimension_numbers, e.g. htmuon_jax.flax_dimension_numbers, to
    make them matrices)

  Args:
    params: the parameter tree the optimizer sees.
    weight_dimension_numbers: as the aliases' `muon_weight_dimension_numbers`.
    summary: only the one-line summary (counts per branch, AdamW reasons,
      the leaves of 3+ dims in AdamW).

  Returns:
    The summary line, then (unless `summary`) one line per leaf: branch,
    path, shape, and `B x (fan_in, fan_out)` or the reason for AdamW.
  """
  routes = leaf_routes(params, weight_dimension_numbers)
  head = _summary(routes, weight_dimension_numbers is None)
  if summary:
    return head
  w = max([len(r.path) for r in routes] + [4])
  sw = max([len(str(r.shape)) for r in routes] + [5])
  lines = [head, f"{'branch':8}  {'leaf':{w}}  {'shape':{sw}}  "]
  lines[1] += "matrices (fan_in, fan_out) / reason"
  for r in routes:
    what = r.reason
    if r.matrix_shape is not None:
      fan_in, fan_out = r.matrix_shape
      what = f"{r.num_matrices} x {r.matrix_shape}  "
      what += f"(fan_in={fan_in}, fan_out={fan_out})"
    lines.append(f"{r.branch:8}  {r.path:{w}}  {str(r.shape):{sw}}  {what}")
  return "\n".join(lines)
