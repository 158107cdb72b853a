"""Helpers for parameter trees: Flax box metadata, path keys, stacked axes.

Flax's containers (`nnx.Variable`, Linen's `nn.Partitioned`) are recognized
by duck typing, so nothing here imports Flax: the core of the package
(`dimension_numbers`) and the Flax layouts (`flax_layouts`) share these
helpers without the core depending on Flax.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional

import jax
from optax.transforms import MaskedNode


# Leaves with these names are never matrices, whatever their rank: a stacked
# (scanned) norm scale `(L, d)` is 2-D but not a weight matrix.
NON_MATRIX_NAMES = ("bias", "scale")
# Attention projections whose biases are `(heads, head_dim)`.
QKV_NAMES = ("query", "key", "value")
# Equinox, PyTorch and Hugging Face names of norm gains and shifts: `weight`
# (`gamma`, `beta`, `g`) is a norm's leaf, not a matrix, when its module's
# name says it is a norm (`norm1`, `ln_1`, `ln_f`, `LayerNorm`,
# `input_layernorm`, `final_layer_norm`, `attn_norm`, ...).
NORM_LEAF_NAMES = ("weight", "gamma", "beta", "g")
NORM_MODULE = re.compile(r"norm|^ln(\d|_|$)", re.IGNORECASE)
# Embedding tables, by their own or their module's name: Flax `embedding`,
# Equinox/PyTorch `embed_tokens/weight`, `word_embeddings`, GPT-2 `wte`/`wpe`.
EMBEDDING_NAME = re.compile(r"embed|^w[tp]e$", re.IGNORECASE)
# Output heads, by their module's name (`lm_head/kernel`, `head/weight`,
# `classifier/kernel`, ...); `output` only at the top of the tree (LLaMA's
# `output.weight`; `attention/output/dense` is no head).
HEAD_NAMES = (
  "lm_head",
  "head",
  "classifier",
  "unembed",
  "unembedding",
  "logits",
  "score",
  "output_head",
)


def is_non_matrix(keys: Sequence[str]) -> bool:
  """A bias, a Flax norm `scale`, or a norm's `weight` (by its module's name)."""
  if not keys:
    return False
  if keys[-1] in NON_MATRIX_NAMES:
    return True
  return (
    keys[-1] in NORM_LEAF_NAMES
    and len(keys) > 1
    and bool(NORM_MODULE.search(keys[-2]))
  )


def is_embedding_path(keys: Sequence[str]) -> bool:
  """An embedding table by name (its own or its module's)."""
  if not keys or is_non_matrix(keys):
    return False
  return any(EMBEDDING_NAME.search(k) for k in keys[-2:])


def is_head_path(keys: Sequence[str]) -> bool:
  """An output head's weight by its module's name (see `HEAD_NAMES`)."""
  if len(keys) < 2 or is_non_matrix(keys):
    return False
  parent = keys[-2].lower()
  return parent in HEAD_NAMES or (len(keys) == 2 and parent == "output")


def is_boxed(x: Any) -> bool:
  """Flax containers that carry metadata: nnx.Variable, nn.Partitioned."""
  return hasattr(x, "get_metadata") or (
    hasattr(x, "names") and hasattr(x, "value") and hasattr(x, "unbox")
  )


def axis_names(x: Any) -> Optional[tuple[Any, ...]]:
  """Logical axis names of a boxed leaf, if any."""
  names = getattr(x, "names", None)  # Linen nn.Partitioned.
  if names is None and hasattr(x, "get_metadata"):
    meta = x.get_metadata()
    names = meta.get(
      "out_sharding", meta.get("sharding_names", meta.get("sharding"))
    )
  if names is None or isinstance(names, jax.sharding.Sharding):
    return None
  return tuple(names)


def leaf_shape(x: Any) -> tuple[int, ...]:
  if hasattr(x, "get_value"):  # nnx.Variable
    x = x.get_value()
  elif hasattr(x, "unbox"):  # Linen nn.Partitioned
    x = x.value
  return tuple(getattr(x, "shape", ()))


def key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_keys(path: Any) -> tuple[str, ...]:
  # `.value` entries appear when a tree is flattened through Flax boxes.
  return tuple(key_name(k) for k in path if getattr(k, "name", None) != "value")


def is_stack_witness(keys: Sequence[str], shape: tuple[int, ...]) -> bool:
  """A bias or norm scale with more than one axis: its module is stacked.

  Norm scales are Flax `scale`s and norms' `weight`s (Equinox, PyTorch
  names; see `is_non_matrix`). Biases and norm scales are 1-D, except the `(heads, head_dim)`
  biases of attention projections (`query`/`key`/`value`), which are
  therefore not witnesses.
  """
  if len(shape) < 2 or not is_non_matrix(keys):
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
  is_leaf = lambda x: is_boxed(x) or isinstance(x, MaskedNode)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
  entries = [
    (
      leaf_keys(path),
      None if isinstance(leaf, MaskedNode) else leaf_shape(leaf),
    )
    for path, leaf in flat
  ]
  counts = [0] * len(entries)
  for keys, shape in entries:
    if shape is None or not is_stack_witness(keys, shape):
      continue
    k, lead = len(shape) - 1, shape[: len(shape) - 1]
    module = keys[:-1]

    def fits(ks: tuple[str, ...], sh: tuple[int, ...]) -> bool:
      # A stacked bias/scale keeps its own (feature) axis after the stack.
      is_vector = is_non_matrix(ks)
      if sh[:k] != lead or len(sh) <= k - 1 + is_vector:
        return False
      # A leaf of k + 1 axes would lose a matrix axis (a 2-D kernel read as
      # a stack of vectors): only the witness's own module may do that, so
      # a 2-D `scale` elsewhere in the tree cannot demote a sibling kernel.
      return is_vector or len(sh) != k + 1 or ks[: len(module)] == module

    for depth in range(len(module) + 1):  # The largest subtree first.
      members = [
        i
        for i, (ks, sh) in enumerate(entries)
        if sh is not None and ks[:depth] == module[:depth]
      ]
      # Members have a shape (sh is not None), as `fits` needs.
      if all(fits(*entries[i]) for i in members):  # type: ignore[arg-type]
        for i in members:
          counts[i] = max(counts[i], k)
        break
  stacked = [
    leaf if isinstance(leaf, MaskedNode) else c
    for (_, leaf), c in zip(flat, counts)
  ]
  return treedef.unflatten(stacked)  # type: ignore[attr-defined]


def stacked_axes(
  shape: tuple[int, ...],
  names: Optional[tuple[Any, ...]],
  stack_axis_names: Sequence[str],
  count: int,
) -> list[int]:
  """Axes with a stack axis name if there are any, else the leading `count`."""
  if names is not None and len(names) == len(shape):
    named = [i for i, n in enumerate(names) if n in stack_axis_names]
    if named:
      return named
  return list(range(min(count, len(shape))))
