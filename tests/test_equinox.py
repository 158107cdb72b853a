"""Equinox trees: modules, `eqx.filter`ed trees with `None` leaves."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import htmuon_jax

KEY = jax.random.key(0)


def _trees():
  linear = eqx.nn.Linear(8, 4, key=KEY)
  mlp = eqx.filter(eqx.nn.MLP(8, 4, 16, 2, key=KEY), eqx.is_array)
  return {"linear": linear, "filtered_mlp": mlp}


@pytest.mark.parametrize("alias", ["htmuon", "muon", "rmnp", "htnormuon"])
@pytest.mark.parametrize("tree", ["linear", "filtered_mlp"])
def test_aliases_init_and_update_equinox(alias, tree):
  params = _trees()[tree]
  opt = getattr(htmuon_jax, alias)(0.02)
  state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(opt.update)(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_equinox_shaped_dimension_number_tree_is_not_called():
  linear = eqx.nn.Linear(8, 4, key=KEY)
  dims = jax.tree.map(lambda _: None, linear)
  dims = eqx.tree_at(
    lambda m: m.weight,
    dims,
    htmuon_jax.MuonDimensionNumbers(reduction_axis=1, output_axis=0),
    is_leaf=lambda x: x is None,
  )
  opt = htmuon_jax.htmuon(0.02, muon_weight_dimension_numbers=dims)
  opt.update(linear, opt.init(linear), linear)


def test_describe_routing_with_none_leaves():
  params = _trees()["filtered_mlp"]
  routes = htmuon_jax.leaf_routes(params)
  assert len(routes) == len(jax.tree.leaves(params))
  text = htmuon_jax.describe_routing(params)
  assert "fan_in=" in text and "fan_out=" in text


def test_equinox_linear_routed_out_in_by_default():
  linear = eqx.nn.Linear(64, 4, key=KEY)  # weight (4, 64)
  routes = {r.path: r for r in htmuon_jax.leaf_routes(linear)}
  assert routes["weight"].matrix_shape == (64, 4)
  stacked = eqx.filter_vmap(
    lambda k: eqx.nn.Linear(8, 8, use_bias=False, key=k)
  )(jax.random.split(KEY, 3))
  routes = {r.path: r for r in htmuon_jax.leaf_routes(stacked)}
  assert routes["weight"].num_matrices == 3
  norm = eqx.filter_vmap(lambda k: eqx.nn.LayerNorm(8, use_bias=False))(
    jax.random.split(KEY, 3)
  )
  assert htmuon_jax.leaf_routes(norm)[0].branch == "adamw"
  conv = eqx.nn.Conv2d(4, 8, 3, key=KEY)  # weight (8, 4, 3, 3)
  routes = {r.path: r for r in htmuon_jax.leaf_routes(conv)}
  assert routes["weight"].matrix_shape == (36, 8)


def test_train_equinox_example_runs_and_learns(capsys):
  import os
  import sys

  examples = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "examples"
  )
  sys.path.insert(0, examples)
  try:
    import train_equinox
  finally:
    sys.path.remove(examples)
  argv = ["--steps", "6", "--log-every", "3", "--dim", "16", "--layers", "2"]
  argv += ["--seq-len", "16", "--batch-size", "4", "--max-chars", "20000"]
  result = train_equinox.main(argv + ["--scan", "--embeddings", "adamw"])
  out = capsys.readouterr().out
  assert (
    "to the spectral branch" in out and "embedding: 2" in out
  )  # token and position
  assert result["losses"][-1] < result["losses"][0]
  routes = {
    r.path: r
    for r in htmuon_jax.leaf_routes(
      eqx.filter(result["model"], eqx.is_array), result["rules"]
    )
  }
  assert routes["blocks/fc/weight"].matrix_shape == (16, 64)
  assert routes["blocks/fc/weight"].num_matrices == 2
  assert routes["embed/weight"].branch == "adamw"
  assert routes["head/weight"].matrix_shape == (
    16,
    result["model"].embed.num_embeddings,
  )
  result = train_equinox.main(argv + ["--optimizer", "muon", "--head", "adamw"])
  assert result["losses"][-1] < result["losses"][0]
