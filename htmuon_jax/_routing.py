"""Which parameters go to the spectral branch and which to AdamW, in words.

The aliases (`htmuon`, `muon`, `rmnp`, ...) send every leaf whose dimension
numbers (`resolve_dimension_numbers`) are a `MuonDimensionNumbers` to the
spectral branch and every other leaf to AdamW. The default routing takes
2-D leaves (and stacks of them under `nnx.scan`) only, so conv kernels and
unnamed 3-D leaves go to AdamW unless dimension numbers say otherwise (e.g.
`htmuon_jax.flax_dimension_numbers`, or `dimension_rules` for any tree:
path patterns, `(out, in)` orientation, embeddings/head to AdamW).
`describe_routing` says which leaf went where, and why, so that this is
never silent.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
from optax.contrib import MuonDimensionNumbers

from htmuon_jax import _dimension_numbers as dn
from htmuon_jax import _param_tree as param_tree


SPECTRAL, ADAMW = "spectral", "adamw"
# How many surprising (>= 3-D) AdamW leaves the summary line names.
_NAMED_IN_SUMMARY = 3


class LeafRoute(NamedTuple):
  """Where one parameter leaf goes.

  Attributes:
    path: the leaf's `/`-joined key path.
    shape: the leaf's shape.
    branch: `"spectral"` or `"adamw"`.
    dimension_numbers: its `MuonDimensionNumbers` (`None` for AdamW).
    num_matrices: how many matrices the spectral branch sees (the product of
      the batch axes; 0 for AdamW).
    matrix_shape: `(fan_in, fan_out)` of each matrix (`None` for AdamW).
    reason: why an AdamW leaf is not a matrix: `"1-D"`, `"4-D"`, ... (its
      rank), `"named 'scale'"` (default routing), `""` for spectral leaves.
  """

  path: str
  shape: tuple[int, ...]
  branch: str
  dimension_numbers: Optional[MuonDimensionNumbers]
  num_matrices: int
  matrix_shape: Optional[tuple[int, int]]
  reason: str


def _unboxed(path: Any) -> Any:
  """The key path without the trailing `.value` of a Flax box
  (`nnx.Variable`, `nn.Partitioned`)."""
  last = path[-1] if path else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
    return path[:-1]
  return path


def _adamw_reason(path: Any, shape: tuple[int, ...], dims: Any) -> str:
  if not shape:
    return "scalar"
  keys = param_tree.leaf_keys(path)
  if isinstance(dims, dn.DimensionRules):
    why = dims.explain(keys, shape)
    if why:
      return why
  if len(shape) >= 2 and (dims is None or isinstance(dims, dn.DimensionRules)):
    if keys and keys[-1] in param_tree.NON_MATRIX_NAMES:
      return f"named {keys[-1]!r}"
    if param_tree.is_non_matrix(keys):
      return "norm weight"
  return f"{len(shape)}-D"


def leaf_routes(
  params: Any, weight_dimension_numbers: dn.WeightDimNumOrFn = None
) -> list[LeafRoute]:
  """The route of every leaf of `params`, in tree order.

  Args:
    params: the parameter tree the optimizer sees (pure dicts, an NNX
      `State`, Linen params, boxed or not).
    weight_dimension_numbers: as the aliases' `muon_weight_dimension_numbers`
      (`None`: the default routing).

  Returns:
    One `LeafRoute` per array leaf.
  """
  dims = dn.resolve_dimension_numbers(weight_dimension_numbers, params)
  dim_leaves = jax.tree.leaves(dims, is_leaf=dn.is_dim_leaf)
  # `None` leaves (an `eqx.filter`ed model) are leaves of both trees here,
  # so the two flattenings line up; they are then skipped.
  leaves = jax.tree_util.tree_flatten_with_path(
    params, is_leaf=lambda x: x is None
  )[0]
  if len(dim_leaves) != len(leaves):
    raise ValueError(
      f"weight_dimension_numbers: resolved to {len(dim_leaves)} entries for "
      f"{len(leaves)} parameter leaves."
    )
  routes = []
  for (path, leaf), d in zip(leaves, dim_leaves):
    if leaf is None:
      continue
    path = _unboxed(path)
    shape = tuple(int(n) for n in np.shape(leaf))
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if d is None:
      routes.append(
        LeafRoute(
          name,
          shape,
          ADAMW,
          None,
          0,
          None,
          _adamw_reason(path, shape, weight_dimension_numbers),
        )
      )
      continue
    fan_in, fan_out = dn.fan_in_fan_out(shape, d)
    routes.append(
      LeafRoute(
        name,
        shape,
        SPECTRAL,
        d,
        math.prod(shape) // max(1, fan_in * fan_out),
        (fan_in, fan_out),
        "",
      )
    )
  return routes


_PLURAL = {"matrix": "matrices", "leaf": "leaves"}


def _count(n: int, word: str) -> str:
  return f"{n} {word if n == 1 else _PLURAL[word]}"


def _summary(routes: list[LeafRoute], default: bool) -> str:
  spectral = [r for r in routes if r.branch == SPECTRAL]
  adamw = [r for r in routes if r.branch == ADAMW]
  matrices = sum(r.num_matrices for r in spectral)
  line = (
    f"routing: {_count(matrices, 'matrix')} in "
    f"{_count(len(spectral), 'leaf')} to the spectral branch, "
    f"{_count(len(adamw), 'leaf')} to AdamW"
  )
  if not adamw:
    return line
  counts: dict[str, int] = {}
  for r in adamw:
    counts[r.reason] = counts.get(r.reason, 0) + 1
  line += (
    " ("
    + ", ".join(f"{k}: {n}" for k, n in counts.items())
    + (")" if default else "; as weight_dimension_numbers says)")
  )
  # Leaves of 3+ dimensions in AdamW are the ones a user may not expect
  # (conv kernels, unnamed stacked weights): name them.
  big = [r for r in adamw if len(r.shape) >= 3]
  if big:
    names = ", ".join(f"{r.path} {r.shape}" for r in big[:_NAMED_IN_SUMMARY])
    more = (
      f" and {len(big) - _NAMED_IN_SUMMARY} more"
      if len(big) > _NAMED_IN_SUMMARY
      else ""
    )
    line += f"; {len(big)} of 3+ dims in AdamW: {names}{more}"
    if default:
      line += (
        " (the default routing takes 2-D leaves and scanned stacks of "
        "them; pass weight_dimension_numbers, e.g. "
        "htmuon_jax.flax_dimension_numbers, to make them matrices)"
      )
  return line


def describe_routing(
  params: Any,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
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
    weight_dimension_numbers: as the aliases' `muon_weight_dimension_numbers`
      (`None`: the default routing).
    summary: return only the one-line summary (counts per branch, the
      reasons for AdamW, the leaves of 3+ dimensions that went to AdamW).

  Returns:
    The summary line, then (unless `summary`) one line per leaf: branch,
    path, shape, and `B x (fan_in, fan_out)` or the reason for AdamW.
  """
  routes = leaf_routes(params, weight_dimension_numbers)
  head = _summary(routes, weight_dimension_numbers is None)
  if summary:
    return head
  width = max([len(r.path) for r in routes] + [4])
  shape_width = max([len(str(r.shape)) for r in routes] + [5])
  lines = [
    head,
    f"{'branch':8}  {'leaf':{width}}  {'shape':{shape_width}}  "
    "matrices (fan_in, fan_out) / reason",
  ]
  for r in routes:
    what = (
      f"{r.num_matrices} x {r.matrix_shape}  (fan_in={r.matrix_shape[0]}, "
      f"fan_out={r.matrix_shape[1]})"
      if r.branch == SPECTRAL and r.matrix_shape is not None
      else f"{r.num_matrices} x {r.matrix_shape}"
      if r.branch == SPECTRAL
      else r.reason
    )
    lines.append(
      f"{r.branch:8}  {r.path:{width}}  {str(r.shape):{shape_width}}  {what}"
    )
  return "\n".join(lines)
