"""Resolving dimension numbers and reshaping leaves to stacks of matrices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as DN

from htmuon_jax import _layouts as dn


def test_default_rule_marks_2d_leaves():
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "k": jnp.ones((2, 3, 4))}
  tree = dn.resolve_dimension_numbers(None, params)
  assert tree == {"w": DN(), "b": None, "k": None}


def test_single_dimension_numbers_broadcast():
  params = {"a": jnp.ones((3, 4)), "b": jnp.ones((5, 6))}
  spec = DN(1, 0)
  assert dn.resolve_dimension_numbers(spec, params) == {"a": spec, "b": spec}


def test_prefix_tree_and_callable():
  params = {
    "enc": {"w": jnp.ones((3, 4)), "w2": jnp.ones((4, 4))},
    "norm": jnp.ones(4),
  }
  prefix = {"enc": DN(), "norm": None}
  expected = {"enc": {"w": DN(), "w2": DN()}, "norm": None}
  assert dn.resolve_dimension_numbers(prefix, params) == expected
  assert dn.resolve_dimension_numbers(lambda p: prefix, params) == expected


def test_masked_nodes_are_kept():
  updates = {"w": jnp.ones((3, 4)), "b": optax.MaskedNode()}
  tree = dn.resolve_dimension_numbers({"w": DN(), "b": None}, updates)
  assert tree == {"w": DN(), "b": optax.MaskedNode()}


def test_structure_mismatch_is_reported():
  with pytest.raises(ValueError, match="weight_dimension_numbers"):
    dn.resolve_dimension_numbers({"x": DN()}, {"w": jnp.ones((2, 2))})


@pytest.mark.parametrize(
  "shape, spec, flat",
  [
    ((3, 4), DN(), (1, 3, 4)),
    ((3, 4), DN(1, 0), (1, 4, 3)),
    ((3, 3, 4, 8), DN((0, 1, 2), 3), (1, 36, 8)),  # conv kernel
    ((5, 6, 7), DN(1, 2), (5, 6, 7)),  # stacked layers
    ((6, 2, 3), DN(0, (1, 2)), (1, 6, 6)),  # attention (d, heads, hd)
    ((2, 6, 5, 3), DN(-3, -1), (10, 6, 3)),  # negative axes, two batch
  ],
)
def test_to_matrices_round_trip(shape, spec, flat):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  m = dn.to_matrices(x, spec)
  chex.assert_shape(m, flat)
  chex.assert_trees_all_equal(dn.from_matrices(m, spec, shape), x)


def test_to_matrices_layout_of_conv_kernel():
  x = jnp.arange(3 * 3 * 4 * 8, dtype=jnp.float32).reshape(3, 3, 4, 8)
  m = dn.to_matrices(x, DN((0, 1, 2), 3))
  # fan-in flattens (h, w, in) in order; fan-out is the channel axis.
  chex.assert_trees_all_equal(m[0], x.reshape(36, 8))


def test_fan_in_fan_out():
  assert dn.fan_in_fan_out((3, 3, 4, 8), DN((0, 1, 2), 3)) == (36, 8)
  assert dn.fan_in_fan_out((5, 6, 7), DN(1, 2)) == (6, 7)


@pytest.mark.parametrize(
  "shape, spec, match",
  [
    ((4,), DN(), "needs a matrix"),
    ((3, 4), DN(0, 0), "disjoint"),
    ((3, 4), DN(0, 2), "out of range"),
    ((3, 4), DN((), 1), "at least one axis"),
  ],
)
def test_invalid_dimension_numbers(shape, spec, match):
  with pytest.raises(ValueError, match=match):
    dn.to_matrices(jnp.ones(shape), spec)


def test_default_rule_never_routes_norm_scales_or_biases():
  params = {
    "layers": {"norm": {"scale": jnp.ones((3, 5))}, "bias": jnp.ones((3, 5))},
    "w": jnp.ones((4, 5)),
  }
  tree = dn.resolve_dimension_numbers(None, params)
  assert tree == {"layers": {"norm": {"scale": None}, "bias": None}, "w": DN()}


def _dims(tree):
  is_leaf = lambda x: x is None or isinstance(x, DN)
  return {
    "/".join(str(getattr(k, "key", "")) for k in path if hasattr(k, "key")): d
    for path, d in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
  }


def test_default_rule_reads_flax_scan_axis_names():
  from flax import nnx

  boxed = lambda v, names: nnx.Param(
    v, out_sharding=names, eager_sharding=False
  )
  state = {
    "kernel": boxed(jnp.ones((3, 4, 5)), ("layers", None, None)),
    "late": boxed(jnp.ones((4, 3, 5)), (None, "layers", None)),
    "scale": boxed(jnp.ones((3, 5)), ("layers", None)),
    "w": nnx.Param(jnp.ones((4, 5))),
    "conv": nnx.Param(jnp.ones((3, 3, 4, 5))),
  }
  dims = _dims(dn.resolve_dimension_numbers(None, state))
  assert dims == {
    "kernel": DN(1, 2),
    "late": DN(0, 2),
    "scale": None,
    "w": DN(),
    "conv": None,
  }


def test_default_rule_treats_a_stack_like_its_layers():
  # Scanned blocks: (L, in, out) kernels are L matrices, the (L, d) norm
  # scale is not a matrix; unstacked leaves follow optax's 2-D rule.
  params = {
    "blocks": {
      "norm": {"scale": jnp.ones((3, 5))},
      "mlp": {"kernel": jnp.ones((3, 5, 8))},
      "heads": {"kernel": jnp.ones((3, 5, 2, 4))},
    },
    "embed": {"embedding": jnp.ones((7, 5))},
    "conv1d": {"kernel": jnp.ones((3, 5, 8)), "bias": jnp.ones((8,))},
  }
  assert _dims(dn.resolve_dimension_numbers(None, params)) == {
    "blocks/norm/scale": None,
    "blocks/mlp/kernel": DN(1, 2),
    "blocks/heads/kernel": None,  # 3-D once unstacked, as unstacked 3-D.
    "embed/embedding": DN(),
    "conv1d/kernel": None,
    "conv1d/bias": None,
  }
