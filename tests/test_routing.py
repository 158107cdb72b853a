"""`describe_routing` says where each leaf goes, and the optimizer agrees."""

import jax
import jax.numpy as jnp
import numpy as np

import htmuon_jax
from htmuon_jax import flax_dimension_numbers


def _params():
  """A conv kernel, a dense layer, a scanned (stacked) block, an unnamed 3-D
  leaf: the cases the default routing treats differently."""
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
    "conv": {"kernel": normal(3, 3, 4, 8)},
    "dense": {"kernel": normal(8, 10), "bias": normal(10)},
    "blocks": {
      "mlp": {"kernel": normal(2, 8, 8), "bias": normal(2, 8)},
      "norm": {"scale": normal(2, 8)},
    },
    "pos": normal(2, 3, 4),
  }


def _by_path(routes):
  return {r.path: r for r in routes}


def test_default_routing_table_says_what_goes_where_and_why():
  routes = _by_path(htmuon_jax.leaf_routes(_params()))
  assert routes["dense/kernel"].branch == "spectral"
  assert routes["dense/kernel"].matrix_shape == (8, 10)
  assert routes["dense/kernel"].num_matrices == 1
  # The scanned stack: 2 matrices of (8, 8); its stacked bias and norm gain
  # are not matrices.
  assert routes["blocks/mlp/kernel"].num_matrices == 2
  assert routes["blocks/mlp/kernel"].matrix_shape == (8, 8)
  assert routes["blocks/norm/scale"].reason == "named 'scale'"
  assert routes["blocks/mlp/bias"].branch == "adamw"
  assert routes["dense/bias"].reason == "1-D"
  assert routes["conv/kernel"].reason == "4-D"
  assert routes["pos"].reason == "3-D"
  text = htmuon_jax.describe_routing(_params())
  lines = text.splitlines()
  assert lines[0].startswith(
    "routing: 3 matrices in 2 leaves to the spectral branch, 5 leaves to AdamW"
  )
  # The surprising AdamW leaves are named in the summary, with a hint.
  assert "conv/kernel (3, 3, 4, 8)" in lines[0] and "pos (2, 3, 4)" in lines[0]
  assert "flax_dimension_numbers" in lines[0]
  # One table row per leaf after the summary and the header.
  assert len(lines) == 2 + len(routes)
  assert any(
    l.split()[:2] == ["spectral", "blocks/mlp/kernel"] and "2 x (8, 8)" in l
    for l in lines
  )
  assert htmuon_jax.describe_routing(_params(), summary=True) == lines[0]


def test_explicit_dimension_numbers_make_the_conv_kernel_a_matrix():
  routes = _by_path(htmuon_jax.leaf_routes(_params(), flax_dimension_numbers))
  assert routes["conv/kernel"].branch == "spectral"
  assert routes["conv/kernel"].matrix_shape == (3 * 3 * 4, 8)
  assert routes["dense/bias"].reason == "1-D"
  summary = htmuon_jax.describe_routing(
    _params(), flax_dimension_numbers, summary=True
  )
  assert "the default routing" not in summary  # no hint: the user chose
  assert "as weight_dimension_numbers says" in summary


def test_routes_match_what_the_optimizer_does():
  """With a zero AdamW learning rate only the spectral leaves move."""
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  for dims in (None, flax_dimension_numbers):
    tx = htmuon_jax.htmuon(
      0.1,
      method="svd",
      adam_learning_rate=0.0,
      muon_weight_dimension_numbers=dims,
    )
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    moved = {
      jax.tree_util.keystr(p, simple=True, separator="/"): bool(jnp.any(u != 0))
      for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    routes = _by_path(htmuon_jax.leaf_routes(params, dims))
    assert moved == {p: r.branch == "spectral" for p, r in routes.items()}


def test_flax_boxes_are_named_without_value_suffix():
  from flax import nnx

  model = nnx.Sequential(
    nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  )
  routes = _by_path(htmuon_jax.leaf_routes(nnx.state(model, nnx.Param)))
  assert set(routes) == {
    "layers/0/kernel",
    "layers/0/bias",
    "layers/1/kernel",
    "layers/1/bias",
  }
  assert routes["layers/0/kernel"].reason == "4-D"
  assert routes["layers/1/kernel"].matrix_shape == (4, 3)
