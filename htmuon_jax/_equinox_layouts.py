"""True axes of Equinox's own layers, without importing Equinox.

Equinox stores `Linear` weights `(out, in)`, `Conv*` weights
`(out, in, *window)` and `Embedding` weights `(vocab, d)`. Where the
parameter tree carries the layer objects (an Equinox model, an
`eqx.filter`ed one, an `eqx.filter_vmap` stack), the default routing reads
these layouts: fan-in is `in` (`in * window` for convs, `vocab` for
embeddings), fan-out is `out` (`d`), leading extra axes are stacked layers
(batch axes), norms (`LayerNorm`, `RMSNorm`, `GroupNorm`) and biases go to
AdamW. Equinox is looked up in `sys.modules`: a tree cannot hold Equinox
layers unless the user has imported it.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import jax
import numpy as np
from optax.contrib import MuonDimensionNumbers


_NORMS = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm")


def _eqx_nn() -> Any:
  eqx = sys.modules.get("equinox")
  return None if eqx is None else eqx.nn


def is_equinox_layer(x: Any) -> bool:
  """An Equinox `Linear`, `Conv*`, `Embedding` or norm layer."""
  nn = _eqx_nn()
  if nn is None:
    return False
  kinds = tuple(
    getattr(nn, n)
    for n in ("Linear", "Conv", "Embedding") + _NORMS
    if hasattr(nn, n)
  )
  return isinstance(x, kinds)


def is_embedding(x: Any) -> bool:
  """An Equinox `Embedding` layer."""
  nn = _eqx_nn()
  return nn is not None and isinstance(x, nn.Embedding)


def _weight_dims(layer: Any, ndim: int) -> Optional[MuonDimensionNumbers]:
  nn = _eqx_nn()
  if isinstance(layer, nn.Linear):
    if ndim < 2 or "scalar" in (layer.in_features, layer.out_features):
      return None
    return MuonDimensionNumbers(reduction_axis=ndim - 1, output_axis=ndim - 2)
  if isinstance(layer, nn.Conv):
    s = ndim - 2 - layer.num_spatial_dims  # stacked axes
    if s < 0:
      return None
    return MuonDimensionNumbers(
      reduction_axis=tuple(range(s + 1, ndim)), output_axis=s
    )
  if isinstance(layer, nn.Embedding):
    # One rule for embeddings: the lookup maps vocab (in) to d (out).
    return MuonDimensionNumbers(reduction_axis=ndim - 2, output_axis=ndim - 1)
  return None


def layer_dimension_numbers(layer: Any) -> Any:
  """The dimension-number subtree of one Equinox layer (same structure)."""

  def rule(path: Any, leaf: Any) -> Any:
    name = getattr(path[-1], "name", None) if path else None
    if name != "weight":
      return None
    return _weight_dims(layer, len(np.shape(leaf)))

  return jax.tree_util.tree_map_with_path(rule, layer)
